"""Finding and loading checkpoints written by the training config."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

_EPOCH_CHECKPOINT = re.compile(r"checkpoint_epoch=(\d+)\.pt$")


def latest_checkpoint(output_dir: str | Path) -> str | None:
    """Path of the newest full-state checkpoint (`checkpoint_epoch=N.pt`) in output_dir, or None."""
    found = []
    for path in Path(output_dir).glob("checkpoint_epoch=*.pt"):
        match = _EPOCH_CHECKPOINT.search(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return str(max(found)[1]) if found else None


def load_network_weights(
    network: torch.nn.Module, path: str | Path, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Load a best-model file (plain state dict) or a full training checkpoint (its "network" entry),
    mapping GPU tensors to `device` so a GPU-trained model loads on a CPU-only machine; returned in eval mode."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise RuntimeError(f"cannot read checkpoint {path}: {error}") from error
    if isinstance(state, dict) and "network" in state:
        state = state["network"]
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise RuntimeError(f"checkpoint {path} does not fit this network definition: {error}") from error
    return network.to(device).eval()
