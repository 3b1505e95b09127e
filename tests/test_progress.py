"""Training progress in files: metrics.csv per epoch (kept consistent on resume), progress.png at each validation,
and TensorBoard pictures of fixed validation cases."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from scripts.labels import SCHEMES, get_scheme
from scripts.prepare_datalist import make_datalist, write_json_atomic
from scripts.progress import (
    MAX_LINE_LUMA,
    RUN_COLUMNS,
    TrainingProgress,
    ValidationPreviews,
    read_rows,
    region_line_colour,
)
from scripts.synthetic import generate_dataset
from scripts.visualize import LABEL_COLOURS
from tests.conftest import REPOSITORY, SMALL_SHAPE, train_workflow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PREVIEW_PICTURES = ("t1c", "ground_truth", "prediction")


def dice_columns(label_scheme: str) -> list[str]:
    return ["val_mean_dice", *(f"val_{region.lower()}_dice" for region in get_scheme(label_scheme).channels)]


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames), list(reader)


def tensorboard_images(log_dir: Path) -> dict[str, list]:
    """{tag: [ImageEvent, ...]} of every event file in `log_dir`."""
    images: dict[str, list] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(path), size_guidance={"images": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["images"]:
            images.setdefault(tag, []).extend(accumulator.Images(tag))
    return images


def has_colour(event) -> bool:
    picture = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")).astype(int)
    return bool((np.ptp(picture, axis=-1) > 0).any())


@pytest.fixture(scope="module")
def resumed_run(trained_fold, synthetic_dataset, synthetic_datalist, tmp_path_factory):
    """The 1-epoch run of `trained_fold`, its metrics.csv given a stale row for epoch 2 (as if killed after writing
    it, before its checkpoint), resumed to 2 epochs with validation every epoch. Returns (the 1-epoch workflow, the
    resumed one, the output folder, what was there before the resume, what the run saw at epoch 2's end: the
    evaluator's scores, the learning rate, the mean loss of the epoch's iterations and the bytes of progress.png)."""
    one_epoch, trained_dir = trained_fold
    output_dir = tmp_path_factory.mktemp("resumed") / "fold0"
    shutil.copytree(trained_dir, output_dir)
    columns, rows = read_csv(output_dir / "metrics.csv")
    before = {"rows": rows, "png": (output_dir / "progress.png").read_bytes()}
    stale = {**rows[0], "epoch": "2", "train_loss": "9"}
    with (output_dir / "metrics.csv").open("a", newline="") as file:
        csv.DictWriter(file, fieldnames=columns, lineterminator="\n").writerow(stale)

    workflow = train_workflow(synthetic_dataset, synthetic_datalist, output_dir, num_epochs=2, val_interval=1)
    trainer = workflow.parser.get_parsed_content("train#trainer")
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    optimizer = workflow.parser.get_parsed_content("optimizer")
    losses: list[float] = []
    seen: dict = {}
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"])))

    def record(engine: Engine) -> None:
        seen[engine.state.epoch] = {
            "metrics": dict(evaluator.state.metrics),
            "lr": optimizer.param_groups[0]["lr"],
            "loss": float(np.mean(losses[-engine.state.epoch_length :])),
            "png": (output_dir / "progress.png").read_bytes(),
        }

    trainer.add_event_handler(Events.EPOCH_COMPLETED, record)
    workflow.run()
    return one_epoch, workflow, output_dir, before, seen


def test_metrics_csv_has_a_row_per_epoch_with_the_runs_values(resumed_run):
    one_epoch, _, output_dir, _, seen = resumed_run
    first = {
        "metrics": one_epoch.parser.get_parsed_content("validate#evaluator").state.metrics,
        "lr": one_epoch.parser.get_parsed_content("optimizer").param_groups[0]["lr"],
    }
    columns, rows = read_csv(output_dir / "metrics.csv")
    assert columns == [*RUN_COLUMNS, *dice_columns("brats2023_ped")]
    assert [row["epoch"] for row in rows] == ["1", "2"]
    for row, epoch in zip(rows, [first, seen[2]], strict=True):
        assert float(row["learning_rate"]) == epoch["lr"]
        assert {name: float(row[name]) for name in dice_columns("brats2023_ped")} == epoch["metrics"]
    assert float(rows[1]["train_loss"]) == pytest.approx(seen[2]["loss"], rel=1e-6)
    assert first["lr"] != seen[2]["lr"]  # the schedule moved: each row has its own epoch's rate
    # Sizes a run: each epoch's seconds (with its validation), and this process's peak RAM, which cannot fall.
    assert all(float(row["seconds"]) > 0 for row in rows)
    assert 0.1 < float(rows[0]["peak_ram_gb"]) <= float(rows[1]["peak_ram_gb"]) < 24
    assert (rows[1]["peak_gpu_gb"] == "") == (not torch.cuda.is_available())


def test_resume_keeps_the_rows_up_to_the_checkpoint_and_replaces_the_rest(resumed_run):
    _, _, output_dir, before, seen = resumed_run
    assert list(seen) == [2]  # resumed after epoch 1
    _, rows = read_csv(output_dir / "metrics.csv")
    assert rows[0] == before["rows"][0]
    assert [row["epoch"] for row in rows] == ["1", "2"] and float(rows[1]["train_loss"]) != 9


def test_progress_png_is_rewritten_at_each_validation(resumed_run):
    _, _, output_dir, before, seen = resumed_run
    first, second = before["png"], seen[2]["png"]
    assert first.startswith(PNG_SIGNATURE) and second.startswith(PNG_SIGNATURE)
    assert first != second
    assert (output_dir / "progress.png").read_bytes() == second
    with Image.open(output_dir / "progress.png") as picture:
        picture.verify()
    assert not [path.name for path in output_dir.iterdir() if ".partial." in path.name]


def test_tensorboard_has_pictures_of_the_first_validation_cases_at_each_validation(resumed_run):
    _, workflow, output_dir, _, _ = resumed_run
    validation = workflow.parser.get_parsed_content("fold_split")[1]
    cases = [case["case"] for case in validation[:2]]
    images = tensorboard_images(output_dir / "tensorboard")
    assert set(images) == {f"preview/{case}/{name}" for case in cases for name in PREVIEW_PICTURES}
    for tag, events in images.items():
        assert sorted(event.step for event in events) == [1, 2]  # the first run's validation and the resumed one's
        assert all(event.width > 0 and event.height > 0 for event in events)
        if tag.endswith("ground_truth"):  # the slice goes through the tumour, drawn in colour over grey
            assert all(has_colour(event) for event in events)
        if tag.endswith("t1c"):
            assert not any(has_colour(event) for event in events)


def test_2024_scheme_has_a_cyst_column_and_no_previews_when_turned_off(tmp_path):
    scheme = "brats2024_ped"
    dataset = tmp_path / "data"
    generate_dataset(dataset, num_train=4, num_val=0, seed=3, shape=SMALL_SHAPE, label_scheme=scheme)
    datalist, problems = make_datalist(dataset, num_folds=2, seed=0, label_scheme=scheme)
    assert not problems
    write_json_atomic(datalist, tmp_path / "datalist.json")
    output_dir = tmp_path / "fold0"
    workflow = train_workflow(dataset, tmp_path / "datalist.json", output_dir, label_scheme=scheme, num_preview_cases=0)
    workflow.run()
    columns, (row,) = read_csv(output_dir / "metrics.csv")
    assert columns == [*RUN_COLUMNS, *dice_columns(scheme)] and "val_cc_dice" in columns
    scores = workflow.parser.get_parsed_content("validate#evaluator").state.metrics
    assert float(row["val_cc_dice"]) == scores["val_cc_dice"]
    assert (output_dir / "progress.png").read_bytes().startswith(PNG_SIGNATURE)
    assert tensorboard_images(output_dir / "tensorboard") == {}


class ToyEvaluator(Engine):
    """Stands for the evaluator: validates at the trainer's epochs in `validate_at`, scoring `score`."""

    def __init__(self, validate_at: set[int], score: float):
        super().__init__(lambda engine, batch: None)
        self.validate_at, self.score = validate_at, score

    def validate(self, trainer: Engine) -> None:
        if trainer.state.epoch in self.validate_at:
            self.state.epoch = trainer.state.epoch
            self.state.metrics = {"val_mean_dice": self.score}


def toy_training(tmp_path: Path, validate_at: set[int]) -> tuple[Engine, TrainingProgress, torch.optim.Optimizer]:
    """A trainer of two iterations per epoch, losses 1 and 3, the learning rate halved at each epoch's end."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    trainer = Engine(lambda engine, batch: [{"loss": torch.tensor(float(batch))}])
    evaluator = ToyEvaluator(validate_at, score=0.75)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, evaluator.validate)
    progress = TrainingProgress(evaluator, optimizer, ["val_mean_dice"], tmp_path / "metrics.csv", tmp_path / "p.png")
    progress.attach(trainer)
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED, lambda _: optimizer.param_groups[0].update(lr=optimizer.param_groups[0]["lr"] / 2)
    )
    return trainer, progress, optimizer


def without_costs(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The rows without the columns that vary from run to run (seconds, memory)."""
    costs = {"seconds", "peak_ram_gb", "peak_gpu_gb"}
    return [{name: value for name, value in row.items() if name not in costs} for row in rows]


def test_rows_hold_mean_loss_rate_and_empty_scores_without_validation(tmp_path):
    trainer, _, _ = toy_training(tmp_path, validate_at={2})
    trainer.run([1.0, 3.0], max_epochs=3)
    _, rows = read_csv(tmp_path / "metrics.csv")
    assert all(float(row["seconds"]) >= 0 and float(row["peak_ram_gb"]) > 0 for row in rows)
    assert without_costs(rows) == [
        {"epoch": "1", "train_loss": "2.0", "learning_rate": "1.0", "val_mean_dice": ""},
        {"epoch": "2", "train_loss": "2.0", "learning_rate": "0.5", "val_mean_dice": "0.75"},
        {"epoch": "3", "train_loss": "2.0", "learning_rate": "0.25", "val_mean_dice": ""},
    ]
    assert (tmp_path / "p.png").is_file()


def test_a_resumed_toy_run_drops_the_rows_after_its_restored_epoch(tmp_path):
    (tmp_path / "metrics.csv").write_text(
        "epoch,train_loss,learning_rate,val_mean_dice\n1,5.0,1.0,0.5\n2,6.0,0.5,\n3,7.0,0.25,0.9\n"
    )
    trainer, _, _ = toy_training(tmp_path, validate_at=set())
    trainer.load_state_dict({"epoch": 1, "epoch_length": 2, "max_epochs": 2})  # as the checkpoint loader does
    trainer.run([1.0, 3.0])
    rows = read_rows(tmp_path / "metrics.csv")
    assert without_costs(rows) == [
        {"epoch": "1", "train_loss": "5.0", "learning_rate": "1.0", "val_mean_dice": "0.5"},
        {"epoch": "2", "train_loss": "2.0", "learning_rate": "1.0", "val_mean_dice": ""},
    ]
    assert rows[0]["seconds"] == "" and rows[1]["seconds"] != ""  # a file from before these columns is kept
    assert not (tmp_path / "p.png").exists()  # drawn at validations only


def test_only_rank_0_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(idist, "get_rank", lambda: 1)
    trainer, _, _ = toy_training(tmp_path, validate_at={1})
    trainer.run([1.0, 3.0], max_epochs=1)
    previews = ValidationPreviews(["case"], tmp_path / "tensorboard")
    previews.pictures = {"case": {"t1c": np.zeros((4, 4, 3), np.uint8)}}
    previews.write(trainer)
    assert list(tmp_path.iterdir()) == []


def test_preview_pictures_are_radiological_through_the_tumour_centre():
    scheme = get_scheme("brats2023_ped")
    shape = (20, 24, 10)
    image = torch.rand((4, *shape)) + 1.0
    image[:, :2] = 0  # outside the brain, at the patient's left: the last columns
    label = np.zeros(shape, dtype=np.uint8)
    label[14:18, 17:21, 6] = 3  # ET on slice 6, on the patient's right (high x) and anterior (high y)
    regions = torch.as_tensor(scheme.labels_to_regions(label), dtype=torch.float32)
    pictures = ValidationPreviews(["case"], "unused").case_pictures(image, regions, torch.zeros_like(regions))
    assert {name: picture.shape for name, picture in pictures.items()} == {
        name: (shape[1], shape[0], 3) for name in PREVIEW_PICTURES
    }
    coloured = np.argwhere(np.ptp(pictures["ground_truth"].astype(int), axis=-1) > 0)
    # Anterior at the top, the patient's right on the left.
    assert {tuple(row) for row in coloured} == {(row, col) for row in range(3, 7) for col in range(2, 6)}
    assert not (np.ptp(pictures["prediction"].astype(int), axis=-1) > 0).any()
    assert (pictures["t1c"][:, -2:] == 0).all() and (pictures["t1c"][:, :-2] > 0).any()


def test_region_colours_are_readable_consistent_and_distinct():
    regions = {region for scheme in SCHEMES.values() for region in scheme.channels} | {"mean"}
    colours = {region: region_line_colour(region) for region in regions}
    assert len(set(colours.values())) == len(regions)
    for colour in colours.values():
        assert np.dot(colour, (0.2126, 0.7152, 0.0722)) <= MAX_LINE_LUMA + 1e-9
    assert colours["CC"] == tuple(c / 255 for c in LABEL_COLOURS["CC"])  # dark enough: the label's own colour
    et = np.array(colours["ET"]) / (np.array(LABEL_COLOURS["ET"]) / 255)
    assert np.allclose(et, et[0]) and et[0] < 1  # ET's yellow, darkened


def test_command_line_draws_the_picture_of_a_metrics_file(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,train_loss,learning_rate,val_mean_dice,val_et_dice\n1,0.9,1e-4,,\n2,0.8,9e-5,0.4,0.3\n")
    command = [sys.executable, "-m", "scripts.progress", "--metrics", str(metrics)]
    result = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "progress.png").read_bytes().startswith(PNG_SIGNATURE)
    missing = subprocess.run(
        [sys.executable, "-m", "scripts.progress", "--metrics", str(tmp_path / "none.csv")],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 1 and "none.csv" in missing.stderr
