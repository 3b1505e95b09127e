"""The training config through MONAI's ConfigWorkflow: properties, one epoch, folds, resuming."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from ignite.engine import Events

from scripts.checkpoints import epoch_checkpoints
from scripts.errors import problem_lines
from scripts.labels import get_scheme
from scripts.prepare_datalist import load_json, make_datalist, write_json_atomic
from scripts.synthetic import generate_dataset
from tests.conftest import SMALL_SHAPE, train_workflow


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
    assert epoch_checkpoints(output_dir)[0] == (1, output_dir / "checkpoint_epoch=1.pt")
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
    assert epoch_checkpoints(output_dir)[0] == (2, output_dir / "checkpoint_epoch=2.pt")


@pytest.mark.parametrize("scheme", ["brats2024_ped", "brats2021"])
def test_one_epoch_with_the_labels_of_another_scheme(scheme, tmp_path):
    """Synthetic cases with the scheme's labels, its datalist and one epoch through the real config: the network
    has one output per region of the scheme and validation reports each."""
    dataset = tmp_path / "data"
    generate_dataset(dataset, num_train=4, num_val=0, seed=3, shape=SMALL_SHAPE, label_scheme=scheme)
    datalist, problems = make_datalist(dataset, num_folds=2, seed=0, label_scheme=scheme)
    assert not problems and datalist["label_scheme"] == scheme
    write_json_atomic(datalist, tmp_path / "datalist.json")
    workflow = train_workflow(dataset, tmp_path / "datalist.json", tmp_path / "fold0", label_scheme=scheme)
    workflow.run()
    channels = get_scheme(scheme).channels
    assert workflow.parser.get_parsed_content("network").out.conv.conv.out_channels == len(channels)
    metrics = workflow.parser.get_parsed_content("validate#evaluator").state.metrics
    assert set(metrics) == {"val_mean_dice", *(f"val_{region.lower()}_dice" for region in channels)}
    assert (tmp_path / "fold0" / "model.pt").is_file()


def test_a_datalist_of_another_scheme_is_refused(synthetic_dataset, synthetic_datalist, tmp_path):
    workflow = train_workflow(synthetic_dataset, synthetic_datalist, tmp_path, label_scheme="brats2024_ped")
    with pytest.raises(RuntimeError) as caught:  # MONAI wraps what a config expression raises
        workflow.parser.get_parsed_content("fold_split")
    (problem,) = problem_lines(caught.value)
    assert str(synthetic_datalist) in problem and "brats2023_ped" in problem and "brats2024_ped" in problem
