"""Training that is safe to kill, resume and trust: atomic checkpoints, the best model across resumes, NaN guards,
the learning rate on resume, and one-line errors from the command line."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events

from scripts.atomic import is_temporary
from scripts.checkpoints import AtomicDiskSaver, epoch_checkpoints, newest_usable_checkpoint, read_checkpoint
from scripts.errors import InputError, problem_lines
from scripts.training import GradScalerState
from tests.conftest import REPOSITORY, TINY_TRAINING, TRAIN_CONFIG, kill_while_writing, train_workflow


def checkpoint_names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("checkpoint_"))


def temporaries(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if is_temporary(path))


def test_saver_removes_the_previous_file_only_after_the_next_is_complete(tmp_path):
    saver = AtomicDiskSaver(tmp_path)
    saver({"step": torch.tensor(1)}, "checkpoint_epoch=1.pt")
    saver.remove("checkpoint_epoch=1.pt")  # ignite asks for this before writing the replacement
    with pytest.raises(Exception):  # noqa: B017 - any failure of torch.save
        saver({"step": lambda: None}, "checkpoint_epoch=2.pt")
    assert checkpoint_names(tmp_path) == ["checkpoint_epoch=1.pt"] and temporaries(tmp_path) == []
    saver({"step": torch.tensor(2)}, "checkpoint_epoch=2.pt")
    assert checkpoint_names(tmp_path) == ["checkpoint_epoch=2.pt"]
    assert torch.load(tmp_path / "checkpoint_epoch=2.pt")["step"] == 2


def test_unusable_checkpoints_are_named_and_the_newest_usable_one_is_chosen(tmp_path, caplog):
    good = {"network": {"weight": torch.ones(2)}, "trainer": {"epoch": 1}}
    torch.save(good, tmp_path / "checkpoint_epoch=1.pt")
    torch.save({**good, "network": {"weight": torch.tensor([1.0, float("nan")])}}, tmp_path / "checkpoint_epoch=2.pt")
    (tmp_path / "checkpoint_epoch=3.pt").write_bytes(b"")
    torch.save(good, tmp_path / "checkpoint_epoch=4.pt")
    with open(tmp_path / "checkpoint_epoch=4.pt", "r+b") as file:
        file.truncate(100)
    assert newest_usable_checkpoint(tmp_path, required=["network", "trainer"]) == tmp_path / "checkpoint_epoch=1.pt"
    skipped = [record.getMessage() for record in caplog.records if record.getMessage().startswith("skipping")]
    assert [message.split(": ")[0].split("/")[-1] for message in skipped] == [
        "checkpoint_epoch=4.pt",
        "checkpoint_epoch=3.pt",
        "checkpoint_epoch=2.pt",
    ]
    assert "unreadable" in skipped[0] and "empty file" in skipped[1] and "NaN/Inf" in skipped[2]

    (tmp_path / "checkpoint_epoch=1.pt").unlink()
    with pytest.raises(InputError) as caught:
        newest_usable_checkpoint(tmp_path, required=["network"])
    assert len(caught.value.problems) == 4 and "no usable checkpoint" in caught.value.problems[-1]
    with pytest.raises(InputError, match="lacks optimizer"):
        read_checkpoint(tmp_path / "checkpoint_epoch=2.pt", required=["network", "optimizer"])


def test_grad_scaler_state_round_trips_through_the_trainer():
    class Trainer:
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    saved = GradScalerState(Trainer()).state_dict()
    assert saved["scale"] == 1024.0
    restored = Trainer()
    restored.scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    GradScalerState(restored).load_state_dict(saved)
    assert restored.scaler.get_scale() == 1024.0
    restored.scaler = None  # AMP off: nothing to restore, and nothing saved
    GradScalerState(restored).load_state_dict(saved)
    assert GradScalerState(restored).state_dict() == {}


def test_checkpoint_holds_the_best_score_its_epoch_and_the_scaler(trained_fold):
    workflow, output_dir = trained_fold
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    content = torch.load(output_dir / "checkpoint_epoch=1.pt", weights_only=True)
    assert content["best_model"] == {"best_metric": evaluator.state.metrics["val_mean_dice"], "best_metric_epoch": 1}
    assert content["scaler"] == {}  # AMP is off on a CPU
    assert content["checkpointer"]["_saved"] == [(1, "checkpoint_epoch=1.pt")]


def test_resume_keeps_the_better_best_model_and_does_not_pile_up_checkpoints(
    trained_fold, synthetic_dataset, synthetic_datalist, tmp_path
):
    output_dir = tmp_path / "fold0"
    shutil.copytree(trained_fold[1], output_dir)
    # A previous best that the next validation cannot beat: the bug overwrote model.pt regardless.
    checkpoint = torch.load(output_dir / "checkpoint_epoch=1.pt", weights_only=True)
    checkpoint["best_model"] = {"best_metric": 0.999, "best_metric_epoch": 1}
    torch.save(checkpoint, output_dir / "checkpoint_epoch=1.pt")
    best_before = (output_dir / "model.pt").read_bytes()

    workflow = train_workflow(synthetic_dataset, synthetic_datalist, output_dir, num_epochs=2)
    workflow.run()
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    assert evaluator.state.metrics["val_mean_dice"] < 0.999
    assert (output_dir / "model.pt").read_bytes() == best_before
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (0.999, 1)
    assert checkpoint_names(output_dir) == ["checkpoint_epoch=2.pt"]
    resumed = torch.load(output_dir / "checkpoint_epoch=2.pt", weights_only=True)
    assert resumed["best_model"] == {"best_metric": 0.999, "best_metric_epoch": 1}


def test_learning_rate_and_schedule_length_given_on_resume_take_effect(
    trained_fold, synthetic_dataset, synthetic_datalist, tmp_path
):
    output_dir = tmp_path / "fold0"
    shutil.copytree(trained_fold[1], output_dir)
    workflow = train_workflow(synthetic_dataset, synthetic_datalist, output_dir, num_epochs=2, learning_rate=5e-4)
    trainer = workflow.parser.get_parsed_content("train#trainer")
    scheduler = workflow.parser.get_parsed_content("train#lr_scheduler")
    optimizer = workflow.parser.get_parsed_content("optimizer")
    seen = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda _: seen.append(optimizer.param_groups[0]["lr"]))
    workflow.run()
    assert scheduler.base_lrs == [5e-4]
    assert scheduler.t_total == 8  # two epochs of 4 steps, not the checkpoint's one epoch
    # The schedule continues where it was (step 4 of 8, warm-up over), now scaled to the new base rate.
    expected = [5e-4 * scheduler.lr_lambdas[0](step) for step in range(4, 8)]
    assert seen == pytest.approx(expected, rel=1e-6)


def test_non_finite_loss_stops_training_before_anything_is_saved(synthetic_dataset, synthetic_datalist, tmp_path):
    # An absurd learning rate makes the weights overflow within the first steps.
    workflow = train_workflow(synthetic_dataset, synthetic_datalist, tmp_path, learning_rate=1e30, warmup_epochs=0)
    with pytest.raises(RuntimeError) as caught:  # MONAI wraps what the config's `run` raises
        workflow.run()
    (problem,) = problem_lines(caught.value)
    assert re.match(r"training stopped: non-finite (loss|weights) .*epoch 1", problem)
    assert "BraTS-PED-" in problem or "end of epoch 1" in problem
    assert checkpoint_names(tmp_path) == [] and not (tmp_path / "model.pt").exists()


def tiny_config(tmp_path: Path, **overrides) -> str:
    """A config file with the tiny settings, layered on train.yaml on the command line (JSON is YAML)."""
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps({**TINY_TRAINING, **overrides}))
    return f"['{TRAIN_CONFIG}', '{path}']"


def bundle_command(config: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", config, *overrides]


@pytest.mark.parametrize("problem", ["dataset_dir", "datalist", "nan_voxel", "debug"])
def test_command_line_reports_a_problem_in_one_line(problem, synthetic_dataset, synthetic_datalist, tmp_path):
    dataset_dir, datalist = synthetic_dataset, synthetic_datalist
    if problem in ("dataset_dir", "debug"):
        dataset_dir = tmp_path / "no-such-folder"
        named = str(dataset_dir)
    elif problem == "datalist":
        datalist = tmp_path / "no-such-datalist.json"
        named = f"datalist not found: {datalist}"
    else:  # a datalist older than the data: one voxel became NaN since it was written
        dataset_dir = tmp_path / "data"
        shutil.copytree(synthetic_dataset, dataset_dir)
        entry = json.loads(datalist.read_text())["training"][0]
        image = nib.load(dataset_dir / entry["image"][0])
        data = image.get_fdata(dtype=np.float32)
        data[10, 10, 10] = np.nan
        nib.save(nib.Nifti1Image(data, image.affine, image.header), dataset_dir / entry["image"][0])
        named = f"{dataset_dir / entry['image'][0]}: 1 non-finite voxels (NaN/Inf)"
    command = bundle_command(tiny_config(tmp_path), "--dataset_dir", str(dataset_dir), "--datalist", str(datalist))
    command += ["--output_dir", str(tmp_path / "out")] + (["--debug", "true"] if problem == "debug" else [])
    result = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    if problem == "debug":
        assert "Traceback" in result.stderr and named in result.stderr
        return
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all(named in line for line in errors)


@pytest.mark.parametrize("target", ["checkpoint_epoch=2.pt", "model.pt"])
def test_killed_during_a_save_resumes_from_the_last_complete_epoch(
    target, synthetic_dataset, synthetic_datalist, tmp_path
):
    output_dir = tmp_path / "fold0"
    command = bundle_command(
        tiny_config(tmp_path, num_epochs=2, roi_size=[64, 64, 32], val_roi_size=[64, 64, 32]),
        *("--dataset_dir", str(synthetic_dataset), "--datalist", str(synthetic_datalist)),
        *("--output_dir", str(output_dir)),
    )
    killed_writing = kill_while_writing(command, output_dir, target)
    assert temporaries(output_dir)  # the kill left a partial file behind
    complete = epoch_checkpoints(output_dir)
    if target.startswith("checkpoint_"):  # the previous checkpoint is intact, and so is the best model
        assert [path.name for _, path in complete] == ["checkpoint_epoch=1.pt"]
        read_checkpoint(complete[0][1], required=["network", "optimizer", "trainer", "best_model", "checkpointer"])
        state = torch.load(output_dir / "model.pt", weights_only=True)
        assert state.keys() == read_checkpoint(complete[0][1])["network"].keys()
        assert all(torch.isfinite(value).all() for value in state.values())
    else:  # killed while the first best model was written: nothing under a final name yet
        assert killed_writing == "model.pt" and complete == [] and not (output_dir / "model.pt").exists()

    rerun = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    if complete:
        assert f"Restored all variables from {complete[0][1]}" in rerun.stdout
        assert "Epoch: 1/2, Iter" not in rerun.stdout and "Epoch: 2/2, Iter: 1/4" in rerun.stdout
    else:
        assert "Restored all variables" not in rerun.stdout
    assert temporaries(output_dir) == []
    assert checkpoint_names(output_dir) == ["checkpoint_epoch=2.pt"]
    final = read_checkpoint(output_dir / "checkpoint_epoch=2.pt", required=["best_model"])
    assert final["trainer"]["iteration"] == 8
    assert final["best_model"]["best_metric_epoch"] in (1, 2)
    assert torch.load(output_dir / "model.pt", weights_only=True).keys() == final["network"].keys()
