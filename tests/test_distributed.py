"""Several processes under torchrun (configs/multi_gpu_*.yaml): two CPU processes on gloo, started by the real
launcher, train one fold on disjoint shares, score validation as one process would, write one set of files,
resume after a kill, and share inference and evaluation so that each case is written once."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import ignite.distributed as idist
import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser

from scripts import distributed
from scripts.atomic import is_temporary
from scripts.checkpoints import epoch_checkpoints, load_network_weights, read_checkpoint
from scripts.errors import InputError
from tests.conftest import (
    INFERENCE_CONFIG,
    REPOSITORY,
    TINY_TRAINING,
    TRAIN_CONFIG,
    kill_while_writing,
    train_workflow,
)
from tests.test_inference import POINTWISE_NETWORK, TINY_INFERENCE, detector_state

CONFIGS = REPOSITORY / "configs"
MULTI_GPU_TRAIN = str(CONFIGS / "multi_gpu_train.yaml")
NUM_PROCESSES = 2
# The tiny settings with half-height windows, as small as Swin UNETR takes: the runs here are several.
TINY = {**TINY_TRAINING, "roi_size": [64, 64, 32], "val_roi_size": [64, 64, 32]}


class CasesSeen:
    """Test handler for a trainer or evaluator: appends, per process, a JSON line {"epoch", "cases"} for each batch
    to `<folder>/<name>_rank<R>.jsonl`."""

    def __init__(self, folder: str, name: str):
        self.path = Path(folder) / f"{name}_rank{idist.get_rank()}.jsonl"

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)

    def record(self, engine: Engine) -> None:
        batch = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
        with self.path.open("a") as file:  # an evaluator's epoch is the trainer's
            file.write(json.dumps({"epoch": engine.state.epoch, "cases": [item["case"] for item in batch]}) + "\n")


def seen(folder: Path, name: str) -> dict[int, list[dict]]:
    """{rank: records} of CasesSeen."""
    return {
        rank: [json.loads(line) for line in (folder / f"{name}_rank{rank}.jsonl").read_text().splitlines()]
        for rank in range(NUM_PROCESSES)
        if (folder / f"{name}_rank{rank}.jsonl").exists()
    }


def torchrun(*arguments: str) -> list[str]:
    """The torchrun command (torch.distributed.run is what the `torchrun` script runs) for two CPU processes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={NUM_PROCESSES}",
        *arguments,
    ]


def worker_lines(output: str) -> list[str]:
    """The lines of the processes' output, without the "[rank<R>]: " that torchrun puts before them."""
    return [re.sub(r"^\[rank\d+\]: ", "", line) for line in output.splitlines()]


def run(command: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=timeout, env=environment)


def tiny_settings(folder: Path, probes: Path | None = None, **overrides) -> str:
    """A config file with the tiny training settings (and the CasesSeen probes), to layer last."""
    settings = {**TINY, **overrides}
    if probes is not None:
        settings["+train#handlers"] = [
            {"_target_": "tests.test_distributed.CasesSeen", "folder": str(probes), "name": "train"}
        ]
        settings["+validate#handlers"] = [
            {"_target_": "tests.test_distributed.CasesSeen", "folder": str(probes), "name": "validate"}
        ]
    path = folder / "tiny.json"
    path.write_text(json.dumps(settings))
    return str(path)


def training_command(settings: str, dataset_dir: Path, datalist: Path, output_dir: Path, *more: str) -> list[str]:
    config = str([TRAIN_CONFIG, MULTI_GPU_TRAIN, settings])
    return torchrun(
        *("-m", "monai.bundle", "run", "training", "--config_file", config),
        *("--dataset_dir", str(dataset_dir), "--datalist", str(datalist), "--output_dir", str(output_dir), *more),
    )


@pytest.fixture(scope="module")
def uneven_datalist(synthetic_datalist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fold 0 of 2 training cases (one per process) and 3 validation cases (2 and 1: shares of unequal size)."""
    datalist = json.loads(synthetic_datalist.read_text())
    entries = datalist["training"][:5]
    for index, entry in enumerate(entries):
        entry["fold"] = 0 if index < 3 else 1
    path = tmp_path_factory.mktemp("uneven") / "datalist.json"
    path.write_text(json.dumps({**datalist, "training": entries}))
    return path


@pytest.fixture(scope="module")
def two_process_run(synthetic_dataset, uneven_datalist, tmp_path_factory):
    """Epoch 1 by one process (in this one), then epoch 2 by two processes under torchrun, resuming from it:
    (finished process, output folder, probe folder, event files of epoch 1)."""
    folder = tmp_path_factory.mktemp("two_processes")
    output_dir, probes = folder / "fold0", folder / "probes"
    probes.mkdir()
    train_workflow(synthetic_dataset, uneven_datalist, output_dir, run_id="training", **TINY).run()
    events_of_epoch_1 = set((output_dir / "tensorboard").iterdir())
    settings = tiny_settings(folder, probes, num_epochs=2)
    finished = run(training_command(settings, synthetic_dataset, uneven_datalist, output_dir))
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished, output_dir, probes, events_of_epoch_1


def fold_cases(datalist: Path, validation: bool) -> list[str]:
    """The case ids of fold 0's validation (or training) cases."""
    entries = json.loads(datalist.read_text())["training"]
    return sorted(entry["image"][0].split("/")[-2] for entry in entries if (entry["fold"] == 0) == validation)


def test_each_process_trains_on_its_own_half_of_the_cases(two_process_run, uneven_datalist):
    _, _, probes, _ = two_process_run
    training = seen(probes, "train")
    assert sorted(training) == [0, 1]
    assert all(record["epoch"] == 2 for records in training.values() for record in records)  # resumed, on both
    shares = {rank: [case for record in records for case in record["cases"]] for rank, records in training.items()}
    assert [len(share) for share in shares.values()] == [1, 1]
    assert sorted(shares[0] + shares[1]) == fold_cases(uneven_datalist, validation=False)


def test_every_validation_case_is_scored_once(two_process_run, uneven_datalist):
    _, _, probes, _ = two_process_run
    validation = seen(probes, "validate")
    scored = {rank: [case for record in records for case in record["cases"]] for rank, records in validation.items()}
    assert sorted(len(cases) for cases in scored.values()) == [1, 2]  # 3 cases, none repeated to even the shares
    assert sorted(scored[0] + scored[1]) == fold_cases(uneven_datalist, validation=True)


def test_validation_dice_equals_the_single_process_value_for_the_same_weights(
    two_process_run, synthetic_dataset, uneven_datalist, tmp_path
):
    _, output_dir, _, _ = two_process_run
    with (output_dir / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    # One process resumes from the two processes' checkpoint (nothing left to train) and validates its weights.
    resumed_dir = tmp_path / "fold0"
    shutil.copytree(output_dir, resumed_dir)
    workflow = train_workflow(
        synthetic_dataset, uneven_datalist, resumed_dir, run_id="training", **{**TINY, "num_epochs": 2}
    )
    workflow.run()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    # Its epochs take two steps (two training cases), the checkpoint's one: counted as this run's steps.
    assert trainer.state.epoch == 2 and trainer.state.iteration == 4
    assert workflow.parser.get_parsed_content("train#lr_scheduler").last_epoch == 4
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    names = ["val_mean_dice", "val_tc_dice", "val_wt_dice", "val_et_dice"]
    single = {name: evaluator.state.metrics[name] for name in names}
    assert {name: float(rows[-1][name]) for name in names} == pytest.approx(single, rel=1e-5, abs=1e-7)


def test_one_set_of_files_written_by_process_0(two_process_run):
    finished, output_dir, _, events_of_epoch_1 = two_process_run
    assert sorted(path.name for path in output_dir.iterdir()) == [
        "checkpoint_epoch=2.pt",
        "metrics.csv",
        "model.pt",
        "progress.png",
        "tensorboard",
    ]
    # An event file's name ends in <pid>.<n>: every file of the torchrun run comes from one process.
    new_events = set((output_dir / "tensorboard").iterdir()) - events_of_epoch_1
    assert new_events and len({path.name.split(".")[-2] for path in new_events}) == 1
    # Logs come from process 0 alone: each iteration and each validation is logged once.
    assert finished.stdout.count("Epoch: 2/2, Iter: 1/1") == 1
    assert finished.stdout.count("Epoch[2] Metrics -- val_et_dice") == 1


def test_checkpoint_counts_the_steps_of_one_process_and_loads_without_ddp(two_process_run):
    _, output_dir, _, _ = two_process_run
    checkpoint = read_checkpoint(output_dir / "checkpoint_epoch=2.pt", required=["network", "lr_scheduler"])
    # One training case per process: one step per epoch, and the schedule is two steps long.
    assert checkpoint["trainer"]["iteration"] == 2 and checkpoint["lr_scheduler"]["t_total"] == 2
    assert checkpoint["lr_scheduler"]["last_epoch"] == 2
    assert not any(key.startswith("module.") for key in checkpoint["network"])
    best = torch.load(output_dir / "model.pt", weights_only=True)
    assert best.keys() == checkpoint["network"].keys()
    # Single-device inference loads both (the config's own network definition, as inference.yaml builds it).
    parser = ConfigParser()
    parser.read_config(TRAIN_CONFIG)
    parser.update(TINY)
    for path, state in ((output_dir / "model.pt", best), (output_dir / "checkpoint_epoch=2.pt", checkpoint["network"])):
        network = load_network_weights(parser.get_parsed_content("network_def"), path)
        assert all(torch.equal(network.state_dict()[key], state[key]) for key in state)


def test_killed_two_process_run_resumes_on_both_processes(
    two_process_run, synthetic_dataset, uneven_datalist, tmp_path
):
    output_dir, probes = tmp_path / "fold0", tmp_path / "probes"
    shutil.copytree(two_process_run[1], output_dir)
    probes.mkdir()
    command = training_command(
        tiny_settings(tmp_path, probes, num_epochs=3), synthetic_dataset, uneven_datalist, output_dir
    )
    killed_writing = kill_while_writing(command, output_dir, "checkpoint_epoch=3.pt", with_children=True)
    assert killed_writing == "checkpoint_epoch=3.pt"
    assert [path.name for _, path in epoch_checkpoints(output_dir)] == ["checkpoint_epoch=2.pt"]
    assert any(is_temporary(path) for path in output_dir.iterdir())
    (probes / "train_rank0.jsonl").unlink()
    (probes / "train_rank1.jsonl").unlink()

    rerun = run(command)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Restored all variables from {output_dir / 'checkpoint_epoch=2.pt'}" in rerun.stdout
    training = seen(probes, "train")
    assert {rank: [record["epoch"] for record in records] for rank, records in training.items()} == {0: [3], 1: [3]}
    assert sorted(path.name for path in output_dir.iterdir() if path.name.startswith("checkpoint")) == [
        "checkpoint_epoch=3.pt"
    ]
    assert not any(is_temporary(path) for path in output_dir.iterdir())
    assert read_checkpoint(output_dir / "checkpoint_epoch=3.pt")["trainer"]["iteration"] == 3


def test_processes_that_see_different_checkpoints_stop_in_one_line(
    two_process_run, synthetic_dataset, uneven_datalist, tmp_path
):
    # As on two nodes whose output folders are not one shared folder: only process 0's holds the checkpoint.
    shutil.copytree(two_process_run[1], tmp_path / "out0")
    (tmp_path / "out1").mkdir()
    settings = tiny_settings(tmp_path, output_dir=f"$'{tmp_path}/out' + os.environ['RANK']", num_epochs=3)
    command = training_command(settings, synthetic_dataset, uneven_datalist, tmp_path / "unused")
    command = command[: command.index("--output_dir")]
    failed = run(command)
    assert failed.returncode != 0
    problem = "error: the processes disagree on the checkpoint to resume from (rank 0: checkpoint_epoch=2.pt, rank 1: "
    expected = [
        f"{problem}no checkpoint); {tmp_path}/out{rank} must be one folder that every node sees" for rank in (0, 1)
    ]
    errors = [line for line in worker_lines(failed.stderr) if line.startswith("error: ")]
    assert expected[0] in errors and set(errors) <= set(expected)  # process 1's may be cut short by torchrun


def test_without_torchrun_the_config_says_how_to_start_it(tmp_path):
    command = [sys.executable, "-m", "monai.bundle", "run", "training"]
    command += ["--config_file", str([TRAIN_CONFIG, MULTI_GPU_TRAIN]), "--output_dir", str(tmp_path)]
    environment = {key: value for key, value in os.environ.items() if key not in distributed.TORCHRUN_VARIABLES}
    failed = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=300, env=environment)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    (error,) = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert "runs under torchrun (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set)" in error


def test_other_processes_leave_out_only_the_log_and_tensorboard_handlers():
    parser = ConfigParser()
    parser.read_config([TRAIN_CONFIG, MULTI_GPU_TRAIN])
    disabled = [id.removesuffix("#_disabled_") for id in _ids(parser.config) if id.endswith("#_disabled_")]
    disabled = [id for id in disabled if parser[f"{id}#_disabled_"] == "$dist.get_rank() > 0"]
    assert sorted(disabled) == ["train#handlers#4", "train#handlers#5", "validate#handlers#1", "validate#handlers#2"]
    targets = [parser[f"{id}#_target_"] for id in sorted(disabled)]
    assert targets == ["StatsHandler", "TensorBoardStatsHandler"] * 2


def _ids(config: object, prefix: str = "") -> list[str]:
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else []
    ids = []
    for key, value in items:
        ids += [f"{prefix}{key}", *_ids(value, f"{prefix}{key}#")]
    return ids


def test_too_few_cases_for_the_processes_is_one_error(monkeypatch):
    monkeypatch.setattr(idist, "get_world_size", lambda: 4)
    monkeypatch.setattr(idist, "get_rank", lambda: 3)
    assert distributed.shard(list("abcdef"), "cases") == ["d"]
    assert distributed.shard(list("abcdef"), "cases", even=True) == ["d", "b"]  # padded to 2 per process
    with pytest.raises(InputError, match="3 validation cases for 4 processes"):
        distributed.shard(list("abc"), "validation cases")


@pytest.fixture(scope="module")
def inference_cases(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 8 synthetic cases, one of them with a truncated T2w file."""
    root = tmp_path_factory.mktemp("inference_cases")
    for split in synthetic_dataset.iterdir():
        for case_dir in split.iterdir():
            shutil.copytree(case_dir, root / case_dir.name, ignore=shutil.ignore_patterns("*-seg.nii.gz"))
    bad = sorted(root.iterdir())[3] / f"{sorted(root.iterdir())[3].name}-t2w.nii.gz"
    bad.write_bytes(bad.read_bytes()[:1000])
    return root


def test_sharded_inference_writes_every_case_once_and_reports_all_processes(inference_cases, tmp_path):
    checkpoint = tmp_path / "detector.pt"
    torch.save(detector_state(), checkpoint)
    settings = tmp_path / "tiny_inference.json"
    settings.write_text(json.dumps({**TINY_INFERENCE, "network_def": POINTWISE_NETWORK}))
    output_dir = tmp_path / "predictions"
    config = str([INFERENCE_CONFIG, str(CONFIGS / "multi_gpu_inference.yaml"), str(settings)])
    command = torchrun("-m", "monai.bundle", "run", "--config_file", config, "--dataset_dir", str(inference_cases))
    command += ["--output_dir", str(output_dir), "--checkpoints", str([str(checkpoint)])]
    cases = sorted(path.name for path in inference_cases.iterdir())
    bad_case = cases[3]  # the 4th case: process 1's second

    first = run(command)
    assert first.returncode != 0  # one bad case, on process 1, fails the whole run
    assert sorted(path.name for path in output_dir.iterdir()) == [
        f"{case}.nii.gz" for case in cases if case != bad_case
    ]
    assert "7 written, 0 already present (skipped), 1 failed" in first.stdout  # counted once, over both processes
    assert "\n".join(worker_lines(first.stderr)).count(f"failed cases:\n{bad_case}: ") == 1  # found by process 1

    (output_dir / f"{cases[0]}.nii.gz").unlink()
    shutil.rmtree(inference_cases / bad_case)
    second = run(command)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "1 written, 6 already present (skipped), 0 failed" in second.stdout
    assert sorted(path.name for path in output_dir.iterdir()) == [
        f"{case}.nii.gz" for case in cases if case != bad_case
    ]


def test_sharded_evaluation_scores_every_case_once_on_process_0(
    two_process_run, synthetic_dataset, uneven_datalist, tmp_path
):
    output_dir = tmp_path / "fold0"
    shutil.copytree(two_process_run[1], output_dir)
    settings = tiny_settings(tmp_path)
    config = str([TRAIN_CONFIG, str(CONFIGS / "evaluate.yaml"), str(CONFIGS / "multi_gpu_evaluate.yaml"), settings])
    command = torchrun("-m", "monai.bundle", "run", "--config_file", config, "--dataset_dir", str(synthetic_dataset))
    finished = run(command + ["--datalist", str(uneven_datalist), "--output_dir", str(output_dir)])
    assert finished.returncode == 0, finished.stderr[-3000:]
    evaluation = output_dir / "evaluation"
    cases = fold_cases(uneven_datalist, validation=True)
    assert sorted(path.name for path in (evaluation / "predictions").iterdir()) == [f"{case}.nii.gz" for case in cases]
    with (evaluation / "metrics_per_case.csv").open() as file:
        rows = [row["case"] for row in csv.DictReader(file)]
    assert sorted(set(rows)) == cases and len(rows) == 3 * len(cases)  # each case once per region (TC, WT, ET)
    assert finished.stdout.count("report with pictures:") == 1
