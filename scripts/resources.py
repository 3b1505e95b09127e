"""What a run costs: peak RAM and GPU memory of this process, for the files that size a run (metrics.csv of
training, inference.json of evaluation)."""

from __future__ import annotations

import resource

import torch


def peak_memory() -> dict[str, float | str]:
    """Peak RAM (resident set of this process; DataLoader workers are not counted) and peak GPU memory allocated
    by torch on this process's device ("" without one), in GB, since the process started."""
    ram = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB
    gpu = round(torch.cuda.max_memory_allocated() / 1e9, 2) if torch.cuda.is_available() else ""
    return {"peak_ram_gb": round(ram, 2), "peak_gpu_gb": gpu}
