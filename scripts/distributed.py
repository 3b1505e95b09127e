"""Several processes, one per GPU (or CPU processes on gloo), started by torchrun: what the multi_gpu configs call.

torch.distributed and DistributedDataParallel do the work; this module only starts the process group from
torchrun's environment (NCCL and ``cuda:LOCAL_RANK`` on GPUs, gloo on CPUs), gives each rank its share of the
cases, and turns what a user can get wrong (no torchrun, more processes than GPUs or cases, ranks that see
different files) into one-line errors rather than a hang or a stack of tracebacks from every rank.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import ignite.distributed as idist
import torch
import torch.distributed as dist
from monai.data import partition_dataset

from scripts.errors import BundleError, InputError

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCH = "torchrun --nproc_per_node N -m monai.bundle run ... (docs/multi_gpu.md)"


def device() -> torch.device:
    """``cuda:LOCAL_RANK`` when this node has GPUs, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if local_rank >= torch.cuda.device_count():
        raise InputError(
            f"process LOCAL_RANK {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
            "--nproc_per_node must not exceed the GPUs of a node"
        )
    return torch.device(f"cuda:{local_rank}")


def init_process_group() -> None:
    """Join the process group that torchrun set up (its environment variables), NCCL on GPUs and gloo on CPUs.
    Ranks other than 0 log warnings and errors only, so that a run prints one log."""
    if dist.is_initialized():
        return
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise InputError(f"a multi_gpu config runs under torchrun ({', '.join(missing)} not set): {LAUNCH}")
    where = device()
    if where.type == "cuda":
        torch.cuda.set_device(where)
    dist.init_process_group(backend="nccl" if where.type == "cuda" else "gloo")
    if dist.get_rank() > 0:
        logging.disable(logging.INFO)


def shard(items: Sequence, what: str, even: bool = False) -> list:
    """This rank's share of `items` (MONAI's partition_dataset, in order: rank r takes items r, r + N, ...).

    `even` pads the shares to one length by repeating items, as training needs (every rank must take the same
    number of steps); without it every item lies in exactly one share, as scoring and prediction need."""
    world = idist.get_world_size()
    if len(items) < world:
        raise InputError(f"{len(items)} {what} for {world} processes: every process needs one; start fewer")
    return partition_dataset(list(items), num_partitions=world, even_divisible=even)[idist.get_rank()]


def agree(value: Any, what: str, hint: str = "") -> Any:
    """`value`, once every rank has the same; BundleError listing each rank's when they differ (the ranks would
    otherwise go on from different states, or wait for one another for ever)."""
    # Wrapped in a list so that every rank takes ignite's object gather, whatever the type of its value.
    values = [other for [other] in idist.all_gather([value])] if idist.get_world_size() > 1 else [value]
    if any(other != values[0] for other in values):
        seen = ", ".join(f"rank {rank}: {other}" for rank, other in enumerate(values))
        raise BundleError(f"the processes disagree on {what} ({seen}){'; ' + hint if hint else ''}")
    return value


def destroy_process_group() -> None:
    """Leave the process group once every process has got here: a process that tore down its gloo connections while
    another was still finishing its last collective made that one abort ("terminate called without an active
    exception"), failing a run that had succeeded. A process that failed never gets here, and torchrun stops the
    others then."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
