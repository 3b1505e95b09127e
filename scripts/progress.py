"""How a training run is going, in files a person can open while it runs: ignite handlers of the training config.

- ``TrainingProgress`` (trainer): ``metrics.csv``, one row per epoch (mean train loss, learning rate at the epoch's
  end, the epoch's seconds with its validation, peak RAM and GPU memory so far, validation Dice mean and per region
  on epochs with validation), and ``progress.png``, drawn from those rows
  at each validation. Both are rewritten whole and atomically; a resumed run keeps the rows up to its checkpoint.
- ``ValidationPreviews`` (evaluator): TensorBoard pictures of a few fixed validation cases at each validation: the
  axial slice through the tumour's centre of T1c, the ground truth and the prediction.

Under DDP every rank takes part and rank 0 alone writes. ``python -m scripts.progress --metrics FILE [--output PNG]``
draws the picture again from a ``metrics.csv``.
"""

from __future__ import annotations

import csv
import io
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import fire
import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from monai.handlers import from_engine
from monai.utils import convert_to_numpy, convert_to_tensor
from torch.utils.tensorboard import SummaryWriter

from scripts.atomic import atomic_output, write_text_atomic
from scripts.cases import MODALITIES
from scripts.labels import DEFAULT_SCHEME, get_scheme
from scripts.resources import peak_memory
from scripts.visualize import LABEL_COLOURS, colour_table, grey_rgb, intensity_window, overlay_labels, tumour_centre

RUN_COLUMNS = ("epoch", "train_loss", "learning_rate", "seconds", "peak_ram_gb", "peak_gpu_gb")
# Regions that are labels keep their label's colour (scripts.visualize); the nested regions have their own.
NESTED_REGION_COLOURS = {"TC": (150, 40, 160), "WT": (20, 130, 140)}
MEAN_COLOUR = (0, 0, 0)
OTHER_COLOUR = (110, 110, 110)
# Line colours lighter than this (Rec. 709 luma, 0-1) are darkened: ET's yellow is unreadable on white.
MAX_LINE_LUMA = 0.55
LEARNING_RATE_COLOUR = "tab:grey"
DPI = 100


def _is_writer() -> bool:
    return idist.get_rank() == 0


def region_line_colour(region: str) -> tuple[float, float, float]:
    """Matplotlib RGB (0-1) of a region's line in the plots: the same for a region in every scheme and plot."""
    if region == "mean":
        rgb = np.array(MEAN_COLOUR) / 255
    else:
        rgb = np.array(NESTED_REGION_COLOURS.get(region) or LABEL_COLOURS.get(region, OTHER_COLOUR)) / 255
    luma = float(rgb @ (0.2126, 0.7152, 0.0722))
    return tuple(float(c) for c in (rgb * MAX_LINE_LUMA / luma if luma > MAX_LINE_LUMA else rgb))


def dice_region(column: str) -> str | None:
    """The region of a validation Dice column ("val_et_dice" -> "ET", "val_mean_dice" -> "mean"), else None."""
    if not (column.startswith("val_") and column.endswith("_dice")):
        return None
    region = column.removeprefix("val_").removesuffix("_dice")
    return region if region == "mean" else region.upper()


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """The rows of a metrics.csv (values as written), or [] when there is none."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as file:
        return [row for row in csv.DictReader(file) if str(row.get("epoch", "")).isdigit()]


def _number(value: object) -> float:
    return float(value) if value not in ("", None) else math.nan


def progress_figure(rows: Sequence[Mapping[str, object]]) -> Figure:
    """Train loss with the learning rate on a second axis (top), validation Dice per region and mean (bottom),
    against epoch, on an Agg canvas."""
    epochs = [int(row["epoch"]) for row in rows]
    figure = Figure(figsize=(8, 6.5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, dice_axes = figure.subplots(2, 1, sharex=True)

    loss_axes.plot(epochs, [_number(row["train_loss"]) for row in rows], color="black", marker=".", label="train loss")
    loss_axes.set_ylabel("train loss")
    rate_axes = loss_axes.twinx()
    rate = [_number(row["learning_rate"]) for row in rows]
    rate_axes.plot(epochs, rate, color=LEARNING_RATE_COLOUR, linestyle="--", label="learning rate")
    rate_axes.set_ylabel("learning rate")
    rate_axes.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    handles = loss_axes.get_legend_handles_labels()[0] + rate_axes.get_legend_handles_labels()[0]
    loss_axes.legend(handles=handles, loc="upper right")
    loss_axes.grid(alpha=0.3)

    columns = [column for column in (rows[0] if rows else {}) if dice_region(column)]
    for column in sorted(columns, key=lambda name: dice_region(name) != "mean"):  # the mean first, drawn below
        region = dice_region(column)
        points = [(epoch, _number(row[column])) for epoch, row in zip(epochs, rows, strict=True)]
        points = [(epoch, value) for epoch, value in points if math.isfinite(value)]
        dice_axes.plot(
            [epoch for epoch, _ in points],
            [value for _, value in points],
            color=region_line_colour(region),
            marker="o",
            linewidth=2.5 if region == "mean" else 1.5,
            label=region,
        )
    dice_axes.set_ylim(0, 1)
    dice_axes.set_ylabel("validation Dice")
    dice_axes.set_xlabel("epoch")
    dice_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if columns:
        dice_axes.legend(loc="lower right", ncols=len(columns))
    dice_axes.grid(alpha=0.3)
    return figure


def save_progress_plot(rows: Sequence[Mapping[str, object]], path: str | Path) -> Path:
    """Write the progress figure of `rows` as a PNG, atomically; returns its path."""
    path = Path(path)
    with atomic_output(path, suffix=".png") as temporary:
        progress_figure(rows).savefig(temporary, dpi=DPI)
    return path


class TrainingProgress:
    """Trainer handler: after every epoch, rewrite `metrics_path` (CSV: epoch, train_loss, learning_rate and
    `metric_names`, which are empty on epochs without validation); after each validation, redraw `plot_path` too.

    Attach it after the ValidationHandler, so that an epoch's row holds that epoch's validation. On resume, the rows
    after the restored epoch (of an epoch killed before its checkpoint was saved) are dropped, so the file always
    agrees with the checkpoint the run continues from."""

    def __init__(
        self,
        evaluator: Engine,
        optimizer: torch.optim.Optimizer,
        metric_names: Sequence[str],
        metrics_path: str | Path,
        plot_path: str | Path | None = None,
    ):
        self.evaluator = evaluator
        self.optimizer = optimizer
        self.columns = (*RUN_COLUMNS, *metric_names)
        self.metrics_path = Path(metrics_path)
        self.plot_path = Path(plot_path) if plot_path is not None else None
        self.rows: list[dict[str, object]] = []
        self._loss_sum = 0.0
        self._loss_count = 0
        self._epoch_start = time.perf_counter()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.read_previous_rows)
        engine.add_event_handler(Events.EPOCH_STARTED, self.start_epoch)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.add_loss)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write_epoch)

    def read_previous_rows(self, engine: Engine) -> None:
        self.rows = read_rows(self.metrics_path) if _is_writer() else []

    def start_epoch(self, engine: Engine) -> None:
        # Fired after the checkpoint loader (which runs at STARTED) has restored the epoch this one follows.
        self.rows = [row for row in self.rows if int(row["epoch"]) < engine.state.epoch]
        self._loss_sum, self._loss_count = 0.0, 0
        self._epoch_start = time.perf_counter()

    def add_loss(self, engine: Engine) -> None:
        self._loss_sum += float(from_engine(["loss"], first=True)(engine.state.output))
        self._loss_count += 1

    def write_epoch(self, engine: Engine) -> None:
        total, count = idist.all_reduce(torch.tensor([self._loss_sum, self._loss_count], dtype=torch.float64)).tolist()
        memory = peak_memory(of_all_processes=True)
        validated = self.evaluator.state.epoch == engine.state.epoch and bool(self.evaluator.state.metrics)
        if not _is_writer():
            return
        scores = self.evaluator.state.metrics if validated else {}
        row = {
            "epoch": engine.state.epoch,
            "train_loss": total / count if count else "",
            "learning_rate": self.optimizer.param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - self._epoch_start, 2),
            **memory,
        }
        row |= {name: float(scores[name]) if name in scores else "" for name in self.columns[len(RUN_COLUMNS) :]}
        self.rows.append(row)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.metrics_path, text.getvalue())
        if validated and self.plot_path is not None:
            save_progress_plot(self.rows, self.plot_path)


def axial_picture(plane: np.ndarray) -> np.ndarray:
    """An axial slice (x, y) of a RAS volume as a picture: anterior at the top and the patient's right on the left
    (radiological, as scripts.visualize draws it)."""
    return plane.T[::-1, ::-1]


class ValidationPreviews:
    """Evaluator handler: at each validation, TensorBoard pictures of the validation `cases` (ids) through their
    tumour's centre: ``preview/<case>/t1c``, ``.../ground_truth`` and ``.../prediction`` (the scheme's label maps
    over T1c, in the colours of scripts.visualize), at the trainer's epoch.

    MONAI's TensorBoardImageHandler does not fit: it shows one batch item (`index`) of the current batch under the
    fixed tags input_0/input_1/output, so fixed cases cannot be chosen and each would overwrite the last, and it
    draws a 3D volume as an animation of every slice rather than the one through the tumour, its regions as raw
    channels rather than a label map. Here a case costs two small label maps and one slice at each validation."""

    def __init__(self, cases: Sequence[str], log_dir: str | Path, label_scheme: str = DEFAULT_SCHEME):
        self.cases = frozenset(cases)
        self.log_dir = str(log_dir)
        self.scheme = get_scheme(label_scheme)
        self.colours = colour_table(self.scheme)
        self.pictures: dict[str, dict[str, np.ndarray]] = {}
        self.writer: SummaryWriter | None = None

    def attach(self, engine: Engine) -> None:
        if not self.cases:
            return
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.pictures.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.draw_cases)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def _label_map(self, regions: torch.Tensor) -> np.ndarray:
        return convert_to_numpy(self.scheme.regions_to_labels(convert_to_tensor(regions, track_meta=False))[0])

    def case_pictures(self, image: torch.Tensor, label: torch.Tensor, prediction: torch.Tensor) -> dict:
        """{"t1c", "ground_truth", "prediction": (H, W, 3) uint8} of one case's image, label and prediction
        (channel first, RAS, the label and prediction as the scheme's region channels)."""
        truth, predicted = self._label_map(label), self._label_map(prediction)
        z = tumour_centre([truth, predicted], truth.shape)[2]
        t1c = axial_picture(convert_to_numpy(image[MODALITIES.index("t1c"), :, :, z], dtype=np.float32))
        grey = grey_rgb(t1c, intensity_window(t1c) if t1c.any() else (0.0, 1.0))
        grey[t1c == 0] = 0  # normalisation centres the brain on 0 and leaves the outside exactly 0: drawn black
        return {
            "t1c": grey,
            "ground_truth": overlay_labels(grey, axial_picture(truth[:, :, z]), self.colours),
            "prediction": overlay_labels(grey, axial_picture(predicted[:, :, z]), self.colours),
        }

    def draw_cases(self, engine: Engine) -> None:
        batch = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
        output = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for item, result in zip(batch, output, strict=True):
            case = item.get("case")
            if case in self.cases:
                self.pictures[case] = self.case_pictures(result["image"], result["label"], result["pred"])

    def write(self, engine: Engine) -> None:
        # Under DDP each rank validates its own share of the cases: rank 0 writes what all of them drew.
        drawn = {case: pictures for shard in idist.all_gather(self.pictures) for case, pictures in shard.items()}
        if not _is_writer() or not drawn:
            return
        if self.writer is None:
            self.writer = SummaryWriter(log_dir=self.log_dir)
        for case, pictures in sorted(drawn.items()):
            for name, picture in pictures.items():
                self.writer.add_image(f"preview/{case}/{name}", picture, engine.state.epoch, dataformats="HWC")
        self.writer.flush()


def main(metrics: str, output: str | None = None) -> None:
    """Draw the training progress of a METRICS file (the metrics.csv of a training run) to --output (default:
    progress.png beside it)."""
    rows = read_rows(metrics)
    if not rows:
        print(f"error: {metrics}: no metrics.csv rows (written by a training run after each epoch)", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {save_progress_plot(rows, output or Path(metrics).with_name('progress.png'))}")


if __name__ == "__main__":
    fire.Fire(main)
