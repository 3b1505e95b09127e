"""The training config through MONAI's ConfigWorkflow: properties, one epoch, folds, resuming."""

from __future__ import annotations

import shutil
from pathlib import Path

from ignite.engine import Events

from scripts.checkpoints import latest_checkpoint
from scripts.prepare_datalist import load_json
from tests.conftest import train_workflow


def case_ids(cases: list[dict]) -> set[str]:
    return {case["case"] for case in cases}


def test_check_properties_reports_nothing_missing(synthetic_dataset, synthetic_datalist, tmp_path):
    workflow = train_workflow(synthetic_dataset, synthetic_datalist, tmp_path)
    assert workflow.check_properties() in (None, [])


def test_one_epoch_trains_validates_and_saves(trained_fold):
    workflow, output_dir = trained_fold
    trainer = workflow.parser.get_parsed_content("train#trainer")
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    assert trainer.state.epoch == 1
    assert trainer.state.iteration == 4  # 4 training cases in fold 0, one crop each
    metrics = evaluator.state.metrics
    assert set(metrics) >= {"val_mean_dice", "val_tc_dice", "val_wt_dice", "val_et_dice"}
    assert all(0.0 <= metrics[name] <= 1.0 for name in metrics)
    assert (output_dir / "model.pt").is_file()
    assert latest_checkpoint(output_dir) == str(output_dir / "checkpoint_epoch=1.pt")
    assert any((output_dir / "tensorboard").iterdir())


def test_fold_override_changes_split_and_output_folder(synthetic_dataset, synthetic_datalist, tmp_path):
    datalist = load_json(synthetic_datalist)
    splits = {}
    for fold in (0, 1):
        workflow = train_workflow(synthetic_dataset, synthetic_datalist, tmp_path, fold=fold)
        workflow.parser["output_dir"] = "$@bundle_root + '/models/fold' + str(@fold)"  # the default
        workflow.parser.parse()
        train = workflow.parser.get_parsed_content("train#dataset#data")
        val = workflow.parser.get_parsed_content("validate#dataset#data")
        expected_val = {Path(entry["label"]).parent.name for entry in datalist["training"] if entry["fold"] == fold}
        assert case_ids(val) == expected_val
        assert case_ids(train).isdisjoint(case_ids(val))
        assert len(train) + len(val) == len(datalist["training"])
        assert workflow.parser.get_parsed_content("output_dir").endswith(f"/models/fold{fold}")
        splits[fold] = case_ids(val)
    assert splits[0] != splits[1]


def test_resumed_run_continues_from_saved_epoch(trained_fold, synthetic_dataset, synthetic_datalist, tmp_path):
    output_dir = tmp_path / "fold0"
    shutil.copytree(trained_fold[1], output_dir)
    workflow = train_workflow(synthetic_dataset, synthetic_datalist, output_dir, num_epochs=2)
    trainer = workflow.parser.get_parsed_content("train#trainer")
    epochs_run = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: epochs_run.append(engine.state.epoch))
    workflow.run()
    assert epochs_run == [2]
    assert trainer.state.iteration == 8
    assert latest_checkpoint(output_dir) == str(output_dir / "checkpoint_epoch=2.pt")
