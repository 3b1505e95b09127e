"""Checkpoint files: written atomically, found and checked on resume, loaded for inference.

Why not ignite's DiskSaver or MONAI's CheckpointSaver (1.6.1): MONAI's writes in place (``atomic=False``), and
both remove the previous checkpoint before the next one is written, so a run killed during a save was left with a
single truncated checkpoint and nothing to resume from.
"""

from __future__ import annotations

import logging
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.handlers.checkpoint import BaseSaveHandler

from scripts.atomic import atomic_output
from scripts.errors import InputError

logger = logging.getLogger(__name__)

_EPOCH_CHECKPOINT = re.compile(r"^checkpoint_epoch=(\d+)\.pt$")
_READ_ERRORS = (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile)


def save_atomic(obj: object, path: str | Path) -> None:
    """`torch.save` to `path`, atomically: the file is complete under its name or not there."""
    with atomic_output(path, suffix=".pt") as temporary:
        torch.save(obj, temporary)


class AtomicDiskSaver(BaseSaveHandler):
    """Save handler for ignite's ``Checkpoint``: every file is written atomically, and a file that ignite asks to
    remove (it asks just before writing its replacement) is removed only once the replacement is complete.
    Only rank 0 writes. `filename` fixes the file name (e.g. ``model.pt``)."""

    def __init__(self, dirname: str | Path, filename: str | None = None):
        self.dirname = Path(dirname)
        self.filename = filename
        self._to_remove: list[Path] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if idist.get_rank() != 0:
            self._to_remove = []
            return
        path = self.dirname / (self.filename or filename)
        save_atomic(checkpoint, path)
        for stale in self._to_remove:
            if stale != path:
                stale.unlink(missing_ok=True)
        self._to_remove = []

    def remove(self, filename: str) -> None:
        self._to_remove.append(self.dirname / (self.filename or filename))


def epoch_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every ``checkpoint_epoch=N.pt`` in output_dir, newest first."""
    found = []
    for path in Path(output_dir).glob("checkpoint_epoch=*.pt"):
        match = _EPOCH_CHECKPOINT.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def non_finite_tensors(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or Inf."""
    return [
        name
        for name, value in state.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all()
    ]


def read_checkpoint(path: str | Path, required: Iterable[str] = (), device: str | torch.device = "cpu") -> dict:
    """A training checkpoint's content, or InputError saying why it cannot be resumed from: unreadable (truncated,
    empty, not a checkpoint), missing one of the `required` entries, or holding non-finite network weights."""
    if Path(path).stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes), left by an interrupted save")
    try:
        content = torch.load(path, map_location=device, weights_only=True)
    except _READ_ERRORS as error:
        raise InputError(f"{path}: unreadable checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(content, dict):
        raise InputError(f"{path}: not a training checkpoint (holds a {type(content).__name__})")
    missing = sorted(set(required) - content.keys())
    if missing:
        raise InputError(f"{path}: lacks {', '.join(missing)} (written by another version of the training config)")
    bad = non_finite_tensors(content.get("network", {}))
    if bad:
        raise InputError(f"{path}: network weights hold NaN/Inf ({len(bad)} tensors, e.g. {bad[0]})")
    return content


def newest_usable_checkpoint(output_dir: str | Path, required: Iterable[str] = ()) -> Path | None:
    """The newest ``checkpoint_epoch=N.pt`` that `read_checkpoint` accepts, or None when there is none at all.

    Each newer one that cannot be used is logged by name and skipped; when checkpoints exist but none can be used,
    InputError lists them all rather than silently starting again from epoch 0.
    """
    required = list(required)
    problems = []
    for _, path in epoch_checkpoints(output_dir):
        try:
            read_checkpoint(path, required)
        except InputError as error:
            logger.warning(f"skipping {error}")
            problems += error.problems
            continue
        if problems:
            logger.warning(f"resuming from {path.name}, the newest usable checkpoint")
        return path
    if problems:
        problems.append(f"{output_dir}: no usable checkpoint to resume from; move these away to start from epoch 0")
        raise InputError(problems)
    return None


def finite_or_raise(network: torch.nn.Module, what: str) -> None:
    """InputError naming `what` if any parameter or buffer of the network is NaN or Inf."""
    bad = non_finite_tensors(network.state_dict())
    if bad:
        raise InputError(f"{what}: network weights hold NaN/Inf ({len(bad)} tensors, e.g. {bad[0]})")


def load_network_weights(
    network: torch.nn.Module, path: str | Path, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Load a best-model file (plain state dict) or a full training checkpoint (its "network" entry),
    mapping GPU tensors to `device` so a GPU-trained model loads on a CPU-only machine; returned in eval mode."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except _READ_ERRORS as error:
        raise InputError(f"{path}: unreadable checkpoint ({type(error).__name__}: {error})") from error
    if isinstance(state, dict) and "network" in state:
        state = state["network"]
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise InputError(f"{path}: does not fit this network definition: {error}") from error
    finite_or_raise(network, str(path))
    return network.to(device).eval()
