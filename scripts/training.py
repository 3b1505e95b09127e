"""Ignite handlers that make a training run safe to kill, resume and trust.

- ``NonFiniteGuard`` stops at the first NaN/Inf loss or weight, before anything of that step is saved.
- ``BestModelSaver`` writes ``model.pt`` atomically on each new best validation score, and carries that score and
  its epoch through the training checkpoint, so a resumed run keeps the real best model.
- ``GradScalerState`` puts the AMP GradScaler into the checkpoint.
- ``resume`` continues from the newest usable checkpoint, with the schedule and learning rate of the config.
- ``region_dice_metrics``: validation Dice per network region of the label scheme.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.handlers import CheckpointLoader, IgniteMetricHandler, from_engine
from monai.metrics import Cumulative

from scripts.atomic import remove_stale_temporaries
from scripts.checkpoints import finite_or_raise, newest_usable_checkpoint, non_finite_tensors, save_atomic
from scripts.distributed import agree
from scripts.errors import BundleError
from scripts.labels import get_scheme, region_output_transform

logger = logging.getLogger(__name__)


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The network inside a (Distributed)DataParallel wrapper, so saved keys have no `module.` prefix."""
    return (
        network.module
        if isinstance(network, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel)
        else network
    )


class NonFiniteGuard:
    """Raise BundleError at the first non-finite loss (naming epoch, iteration and the batch's cases), and at the end
    of an epoch, before validation and checkpointing, if any weight is non-finite; so a diverged run exits non-zero
    and never saves NaN weights. Attach it before every other handler. (ignite's TerminateOnNan ends the run as if
    it had finished, with exit status 0.)"""

    def __init__(self, network: torch.nn.Module):
        self.network = network

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.check_loss)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.check_weights)
        # ignite runs only the first EXCEPTION_RAISED handler that raises: re-raising here keeps StatsHandler from
        # logging a traceback over a problem that is already described in one line.
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.reraise)

    @staticmethod
    def _where(engine: Engine) -> str:
        state = engine.state
        in_epoch = (state.iteration - 1) % state.epoch_length + 1 if state.epoch_length else state.iteration
        return (
            f"epoch {state.epoch}, iteration {state.iteration} (step {in_epoch} of {state.epoch_length} in the epoch)"
        )

    def check_loss(self, engine: Engine) -> None:
        value = float(from_engine(["loss"], first=True)(engine.state.output))
        if math.isfinite(value):
            return
        batch = engine.state.batch  # MONAI has decollated it into a list of dicts by now
        items = batch if isinstance(batch, list) else [batch]
        cases = [item.get("case") for item in items if isinstance(item, Mapping) and item.get("case")]
        names = ", ".join(dict.fromkeys(map(str, cases))) or "unknown"
        raise BundleError(
            f"training stopped: non-finite loss ({value}) at {self._where(engine)}, cases in the batch: {names}; "
            f"nothing of epoch {engine.state.epoch} was saved (rerun to resume from the last checkpoint, "
            "or lower --learning_rate)"
        )

    def check_weights(self, engine: Engine) -> None:
        bad = non_finite_tensors(_unwrap(self.network).state_dict())
        if bad:
            raise BundleError(
                f"training stopped: non-finite weights at the end of epoch {engine.state.epoch} ({len(bad)} tensors, "
                f"e.g. {bad[0]}); nothing of this epoch was saved (rerun to resume from the last checkpoint)"
            )

    @staticmethod
    def reraise(engine: Engine, error: BaseException) -> None:
        raise error


class BestModelSaver:
    """Evaluator handler: on each new best key metric, write the network's weights (a plain state dict, what
    inference loads) to `path` atomically; under DDP every rank takes part and rank 0 alone writes.

    MONAI's evaluator already keeps the best score and its epoch (``state.best_metric``, ``best_metric_epoch``);
    this handler's ``state_dict`` carries them in the training checkpoint, so after a resume a worse score does not
    replace the best model. (MONAI's CheckpointSaver forgets its best score on resume and writes in place.)"""

    def __init__(self, network: torch.nn.Module, path: str | Path):
        self.network = network
        self.path = Path(path)
        self.engine: Engine | None = None

    def attach(self, engine: Engine) -> None:
        self.engine = engine
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        state = engine.state
        if state.best_metric_epoch != state.epoch:
            return
        if not math.isfinite(state.best_metric):
            raise BundleError(f"validation at epoch {state.epoch} gave a non-finite score ({state.best_metric})")
        network = _unwrap(self.network)
        finite_or_raise(network, f"best model of epoch {state.epoch}")
        if idist.get_rank() == 0:
            save_atomic(network.state_dict(), self.path)
        logger.info(f"new best {state.key_metric_name} {state.best_metric:.4f} at epoch {state.epoch}: {self.path}")

    def state_dict(self) -> dict:
        state = self.engine.state
        return {"best_metric": float(state.best_metric), "best_metric_epoch": int(state.best_metric_epoch)}

    def load_state_dict(self, state_dict: Mapping) -> None:
        self.engine.state.best_metric = float(state_dict["best_metric"])
        self.engine.state.best_metric_epoch = int(state_dict["best_metric_epoch"])
        if self.engine.state.best_metric_epoch > 0:
            logger.info(
                f"best model so far: {self.path.name} from epoch {self.engine.state.best_metric_epoch} "
                f"(score {self.engine.state.best_metric:.4f})"
            )


class GradScalerState:
    """The trainer's AMP GradScaler as a checkpoint entry. MONAI's Trainer.run makes a new GradScaler on every run,
    so the checkpoint reaches it through the trainer when saving and loading instead of holding one."""

    def __init__(self, trainer: Engine):
        self.trainer = trainer

    def state_dict(self) -> dict:
        scaler = getattr(self.trainer, "scaler", None)
        return scaler.state_dict() if scaler is not None else {}

    def load_state_dict(self, state_dict: Mapping) -> None:
        scaler = getattr(self.trainer, "scaler", None)
        if scaler is not None and state_dict:
            scaler.load_state_dict(state_dict)


# What a scheduler's state holds about where it is, as opposed to the schedule it follows.
_SCHEDULE_POSITION = frozenset({"last_epoch", "_step_count", "_last_lr", "base_lrs", "_get_lr_called_within_step"})


def _schedule_settings(scheduler: object) -> dict:
    state = scheduler.state_dict() if hasattr(scheduler, "state_dict") else {}
    return {key: value for key, value in state.items() if key not in _SCHEDULE_POSITION}


def _apply_configured_schedule(
    optimizer: torch.optim.Optimizer, scheduler: object, settings: Mapping, learning_rate: float
) -> None:
    """After a resume restored the old schedule, make the configured one take effect at the restored position: its
    settings (e.g. the length from --num_epochs) and its base learning rate (--learning_rate)."""
    restored = scheduler.state_dict()
    changed = sorted(key for key, value in settings.items() if restored.get(key) != value)
    if changed:
        scheduler.load_state_dict({**restored, **settings})
        logger.warning(f"schedule settings {changed} follow the config, not the checkpoint")
    restored_rates = list(restored.get("base_lrs", []))
    if not restored_rates or all(math.isclose(rate, learning_rate, rel_tol=1e-9) for rate in restored_rates):
        return
    for group, base in zip(optimizer.param_groups, restored_rates, strict=True):
        group["lr"] = learning_rate * (group["lr"] / base if base else 1.0)
        group["initial_lr"] = learning_rate
    scheduler.base_lrs = [learning_rate] * len(restored_rates)
    logger.warning(
        f"learning rate {learning_rate:g} replaces the checkpoint's {restored_rates[0]:g}; "
        f"the schedule continues from step {restored.get('last_epoch')}"
    )


def resume(
    trainer: Engine,
    checkpointer: Checkpoint,
    state: Mapping[str, object],
    output_dir: str | Path,
    device: str | torch.device,
    learning_rate: float | None = None,
) -> Path | None:
    """Prepare `trainer` to continue from the newest usable checkpoint in `output_dir` (returned; None to start
    afresh): remove the temporaries of killed runs, skip unreadable or non-finite checkpoints (each named in the
    log), restore `state` and the `checkpointer`'s list of saved files; the configured schedule and `learning_rate`
    apply from the restored step on. Under DDP every rank must find the same checkpoint."""
    for path in remove_stale_temporaries(output_dir):
        logger.warning(f"removed {path.name}, left by an interrupted save")
    to_load = {**state, "checkpointer": checkpointer}
    path = newest_usable_checkpoint(output_dir, required=to_load)
    # Under DDP a rank that started afresh beside one that resumed would train a different model (or hang).
    agree(
        path.name if path else "no checkpoint",
        "the checkpoint to resume from",
        f"{output_dir} must be one folder that every node sees",
    )
    if path is None:
        return None
    epoch_length = trainer.state.epoch_length  # as configured, before the checkpoint replaces it
    CheckpointLoader(str(path), to_load, map_location=device).attach(trainer)
    if learning_rate is not None and "optimizer" in state and "lr_scheduler" in state:
        optimizer, scheduler = state["optimizer"], state["lr_scheduler"]
        settings = _schedule_settings(scheduler)  # as configured, before the checkpoint replaces them
        trainer.add_event_handler(
            Events.STARTED, lambda _: _apply_configured_schedule(optimizer, scheduler, settings, learning_rate)
        )
    trainer.add_event_handler(
        Events.STARTED, lambda _: _continue_with_epochs_of(trainer, epoch_length, state.get("lr_scheduler"))
    )
    return path


def _continue_with_epochs_of(trainer: Engine, epoch_length: int | None, scheduler: object | None) -> None:
    """Checkpoints are written at the end of an epoch. When epochs now take another number of steps (another number
    of processes, batch size or training cases), continue after that epoch, and the schedule at the step where the
    new epochs put it; ignite would keep the checkpoint's epoch length and step count."""
    state = trainer.state
    if epoch_length is None or state.epoch_length == epoch_length:
        return
    logger.warning(
        f"epochs take {epoch_length} steps, the checkpoint's took {state.epoch_length} (another number of processes, "
        f"batch size or training cases): continuing after epoch {state.epoch} at step {state.epoch * epoch_length}"
    )
    state.epoch_length = epoch_length
    state.iteration = state.epoch * epoch_length
    if scheduler is not None:
        scheduler.last_epoch = state.iteration - 1
        scheduler.step()  # sets the learning rate of that step


def region_dice_metrics(dice_metric: Cumulative, label_scheme: str, prefix: str = "val") -> dict[str, Any]:
    """One Dice handler per network region of the label scheme, named ``{prefix}_{region}_dice`` (``val_et_dice``),
    each with its own copy of `dice_metric`."""
    return {
        f"{prefix}_{region.lower()}_dice": IgniteMetricHandler(
            metric_fn=copy.deepcopy(dice_metric), output_transform=region_output_transform(region, label_scheme)
        )
        for region in get_scheme(label_scheme).channels
    }
