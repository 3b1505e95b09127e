"""Experiment tracking: `python -m monai.bundle run ... --tracking mlflow` records training, evaluation and inference
runs in a local MLflow store (MONAI's default: SQLite, <output_dir>/mlruns.db), each with its metrics."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigWorkflow

from scripts.cases import MODALITIES, case_file_name
from tests.conftest import INFERENCE_CONFIG, REPOSITORY, TINY_TRAINING, TRAIN_CONFIG, train_workflow
from tests.test_distributed import run, torchrun
from tests.test_evaluate_config import EVALUATE_CONFIG
from tests.test_inference import (
    POINTWISE_NETWORK,
    TINY_INFERENCE,
    detector_state,
    inference_command,
    inference_workflow,
)

mlflow = pytest.importorskip("mlflow")

# One training and one validation case: a tracked training of one iteration and an evaluation of one case.
BROKEN_CASE = "BraTS-PED-09999-000"
ONE_CASE_EACH = {
    "fold_split": "$[part[:1] for part in prepare_datalist.fold_split(@datalist, @dataset_dir, @fold, @label_scheme)]"
}


def tracked_runs(store: Path, experiment: str = "monai_experiment") -> list:
    """The runs of `experiment` in the SQLite store `store`, oldest first."""
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    (found,) = [e for e in client.search_experiments() if e.name == experiment]
    return sorted(client.search_runs([found.experiment_id]), key=lambda found_run: found_run.info.start_time)


@pytest.fixture(scope="module")
def one_case(synthetic_dataset, tmp_path_factory) -> Path:
    """A dataset folder holding one synthetic case (linked)."""
    root = tmp_path_factory.mktemp("one_case")
    case_dir = sorted(path.parent for path in synthetic_dataset.glob("*/*/*-t1c.nii.gz"))[0]
    (root / case_dir.name).symlink_to(case_dir)
    return root


@pytest.fixture(scope="module")
def pointwise_checkpoint(tmp_path_factory) -> Path:
    """Weights of the 1x1x1 convolution that the inference tests put in place of Swin UNETR."""
    path = tmp_path_factory.mktemp("pointwise") / "model.pt"
    torch.save(detector_state(), path)
    return path


@pytest.fixture(scope="module")
def tracked_fold(synthetic_dataset, synthetic_datalist, tmp_path_factory) -> Path:
    """The output folder of a tracked training (one epoch of one case)."""
    output_dir = tmp_path_factory.mktemp("tracked_fold")
    workflow = train_workflow(
        synthetic_dataset, synthetic_datalist, output_dir, run_id="training", tracking="mlflow", **ONE_CASE_EACH
    )
    workflow.run()
    workflow.finalize()
    return output_dir


def test_training_is_tracked(tracked_fold):
    """One run with the loss of each iteration and the validation Dice, as metrics.csv has them."""
    (training,) = tracked_runs(tracked_fold / "mlruns.db")
    assert training.info.status == "FINISHED"
    with open(tracked_fold / "metrics.csv", newline="") as file:
        (epoch,) = csv.DictReader(file)
    metrics = training.data.metrics
    assert metrics["train_loss"] == pytest.approx(float(epoch["train_loss"]))  # one iteration: the epoch's mean
    for name in ("val_mean_dice", "val_tc_dice", "val_wt_dice", "val_et_dice"):
        assert metrics[name] == pytest.approx(float(epoch[name]))
    assert training.data.params["max_epochs"] == "1"


def test_evaluation_is_tracked_with_its_scores(tracked_fold, synthetic_dataset, synthetic_datalist, tmp_path):
    """The evaluation's run (in the training's store) holds the inference numbers and the official scores."""
    workflow = ConfigWorkflow(
        config_file=[TRAIN_CONFIG, EVALUATE_CONFIG],
        workflow_type="infer",
        tracking="mlflow",
        **TINY_TRAINING | ONE_CASE_EACH,
        dataset_dir=str(synthetic_dataset),
        datalist=str(synthetic_datalist),
        output_dir=str(tracked_fold),
        evaluation_dir=str(tmp_path / "evaluation"),
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()

    training, evaluation = tracked_runs(tracked_fold / "mlruns.db")
    assert "train_loss" in training.data.metrics and evaluation.info.status == "FINISHED"
    metrics = evaluation.data.metrics
    assert (metrics["cases_written"], metrics["cases_failed"], metrics["num_cases"]) == (1, 0, 1)
    assert metrics["seconds_per_case"] > 0 and metrics["peak_ram_gb"] > 0
    # Every figure of summary.json, under its path: legacy and lesion-wise Dice, HD95, ... of each region.
    summary = json.loads((tmp_path / "evaluation" / "summary.json").read_text())
    assert set(summary["regions"]) == {"TC", "WT", "ET"}
    for region, region_metrics in summary["regions"].items():
        for metric, statistics in region_metrics.items():
            for statistic, value in statistics.items():
                assert metrics[f"regions/{region}/{metric}/{statistic}"] == pytest.approx(value)


def test_inference_command_is_tracked(one_case, pointwise_checkpoint, tmp_path):
    """As a user runs it: `--tracking mlflow` on the command line, the store in the output folder by default."""
    output_dir = tmp_path / "predictions"
    command = inference_command(tmp_path, one_case, output_dir, pointwise_checkpoint)
    result = subprocess.run(
        [*command, "--tracking", "mlflow", "--experiment_name", "inference"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (case_dir,) = one_case.iterdir()
    assert (output_dir / f"{case_dir.name}.nii.gz").is_file()

    (inference,) = tracked_runs(output_dir / "mlruns.db", "inference")
    assert inference.info.status == "FINISHED"
    metrics = inference.data.metrics
    assert (metrics["cases_written"], metrics["cases_skipped_existing"], metrics["cases_failed"]) == (1, 0, 0)
    assert metrics["seconds_per_case"] > 0 and metrics["peak_ram_gb"] > 0
    assert inference.data.params["epoch_length"] == "1"  # one case


@pytest.fixture(scope="module")
def with_a_broken_case(one_case, tmp_path_factory) -> Path:
    """The case of `one_case` and BROKEN_CASE, which lacks its T2w file."""
    data = tmp_path_factory.mktemp("with_a_broken_case")
    (good,) = one_case.iterdir()
    (data / good.name).symlink_to(good.resolve())
    (data / BROKEN_CASE).mkdir()
    for modality in MODALITIES:
        if modality != "t2w":
            (data / BROKEN_CASE / case_file_name(BROKEN_CASE, modality)).symlink_to(
                good / case_file_name(good.name, modality)
            )
    return data


def test_failed_cases_are_tracked_and_the_run_closed(with_a_broken_case, pointwise_checkpoint, tmp_path):
    """A case that cannot be read is counted, the run still ends as FINISHED, and the command fails after it."""
    store = tmp_path / "tracking" / "mlruns.db"
    workflow = inference_workflow(
        tmp_path / "predictions",
        [pointwise_checkpoint],
        dataset_dir=str(with_a_broken_case),
        tracking="mlflow",
        tracking_uri=f"sqlite:///{store}",
    )
    with pytest.raises(SystemExit, match=f"failed cases:\n{BROKEN_CASE}: "):
        workflow.run()

    (inference,) = tracked_runs(store)
    assert inference.info.status == "FINISHED"
    metrics = inference.data.metrics
    assert (metrics["cases_written"], metrics["cases_failed"]) == (1, 1)


class MetricsProbe:
    """What handlers attached after the predictor's own find in `state.metrics` when the cases are done."""

    def __init__(self) -> None:
        self.metrics: dict | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.record)

    def record(self, engine: Engine) -> None:
        self.metrics = dict(engine.state.metrics)


def count_label_maps(output_dir: str) -> dict:
    """A stand-in for evaluation's scores: how many label maps `output_dir` holds."""
    return {"label_maps": {"count": len(list(Path(output_dir).glob("*.nii.gz")))}}


@pytest.mark.parametrize("broken", [False, True])
def test_handlers_find_the_summary_and_the_scores_once_every_case_is_written(
    broken, one_case, with_a_broken_case, pointwise_checkpoint, tmp_path
):
    """Scores are computed once every case is written, and only if none failed (evaluation's official metrics)."""
    output_dir = tmp_path / "predictions"
    score = {"_target_": f"{__name__}.count_label_maps", "_mode_": "callable", "output_dir": str(output_dir)}
    workflow = inference_workflow(
        output_dir,
        [pointwise_checkpoint],
        dataset_dir=str(with_a_broken_case if broken else one_case),
        handlers=[{"_target_": f"{__name__}.MetricsProbe"}],
        **{"evaluator#score": score},
    )
    if broken:
        with pytest.raises(SystemExit):
            workflow.run()
    else:
        workflow.run()

    (probe,) = workflow.parser.get_parsed_content("handlers")
    assert (probe.metrics["cases_written"], probe.metrics["cases_failed"]) == (1, int(broken))
    assert probe.metrics["peak_ram_gb"] > 0
    assert probe.metrics.get("label_maps/count") == (None if broken else 1)


def test_under_torchrun_process_0_alone_tracks_the_cases_of_all(synthetic_dataset, pointwise_checkpoint, tmp_path):
    """Several processes share the cases; one run, by process 0, counts every process's cases."""
    data = tmp_path / "data"
    data.mkdir()
    for case_dir in sorted(path.parent for path in synthetic_dataset.glob("*/*/*-t1c.nii.gz"))[:3]:
        (data / case_dir.name).symlink_to(case_dir)
    settings = tmp_path / "tiny_inference.json"
    settings.write_text(json.dumps({**TINY_INFERENCE, "network_def": POINTWISE_NETWORK}))
    config = str([INFERENCE_CONFIG, str(REPOSITORY / "configs" / "multi_gpu_inference.yaml"), str(settings)])
    output_dir = tmp_path / "predictions"
    command = torchrun("-m", "monai.bundle", "run", "--config_file", config, "--dataset_dir", str(data))
    command += ["--output_dir", str(output_dir), "--checkpoints", str([str(pointwise_checkpoint)]), "--tracking"]
    finished = run([*command, "mlflow"])
    assert finished.returncode == 0, finished.stderr[-3000:]

    (tracked,) = tracked_runs(output_dir / "mlruns.db")
    assert tracked.info.status == "FINISHED"
    assert (tracked.data.metrics["cases_written"], tracked.data.metrics["cases_failed"]) == (3, 0)
    assert tracked.data.params["epoch_length"] == "2"  # process 0's share: cases 1 and 3
