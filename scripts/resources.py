"""What a run costs: peak RAM and GPU memory of this process, for the files that size a run (metrics.csv of
training, inference.json of evaluation), and a way to keep the RAM a run holds down."""

from __future__ import annotations

import ctypes
import multiprocessing
import platform
import resource
from concurrent.futures import ProcessPoolExecutor

import ignite.distributed as idist
import torch


def peak_memory(of_all_processes: bool = False) -> dict[str, float | str]:
    """Peak RAM (resident set of this process; DataLoader workers are not counted) and peak GPU memory allocated
    by torch on this process's device ("" without one), in GB, since the process started; with
    `of_all_processes` (every rank must call it then) the largest of the torchrun processes'."""
    ram = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    if of_all_processes and idist.get_world_size() > 1:
        # On the process group's device: NCCL reduces GPU tensors only.
        peaks = torch.tensor([ram, gpu or 0], dtype=torch.float64, device=idist.device())
        ram, largest_gpu = idist.all_reduce(peaks, op="MAX").tolist()
        gpu = None if gpu is None else largest_gpu
    return {"peak_ram_gb": round(ram / 1e9, 2), "peak_gpu_gb": "" if gpu is None else round(gpu / 1e9, 2)}


# glibc's mallopt parameter for the size from which allocations are mapped (and unmapped when freed) on their own.
M_MMAP_THRESHOLD = -3


def return_freed_memory(threshold_mb: float = 1.0) -> bool:
    """Make glibc's malloc give every freed block of `threshold_mb` or more back to the system at once; returns
    whether it could (glibc only: elsewhere nothing changes and it returns False).

    Why: by default glibc raises its mapping threshold to the size of each mapped block freed, up to 32 MB, and keeps
    freed blocks under it for reuse. A Swin UNETR window at feature size 48 allocates and frees activations of every
    size up to hundreds of MB, so windows can leave some of them resident: one full-size case peaked at 3.83 GB
    without this and 3.38 GB with it (docs/inference.md). A fixed threshold also switches that adjustment off. torch
    has no setting of its own for how its CPU allocations are returned (2.13)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold_mb * 2**20)))


def in_fresh_process(function, *args):
    """`function(*args)` in a new spawned process, so that its peak RSS is its own (a forked one would inherit this
    one's memory and threads); a process killed meanwhile (out of memory) raises BrokenProcessPool."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()
