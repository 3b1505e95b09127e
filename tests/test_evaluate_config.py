"""The evaluation config layered on the training config: a fold's checkpoint, its validation cases,
predictions on each input's grid and the official metric files."""

from __future__ import annotations

import csv
import json
import os

import nibabel as nib
import numpy as np
from monai.bundle import ConfigParser, ConfigWorkflow

from scripts.evaluate import PER_CASE_COLUMNS
from tests.conftest import INFERENCE_CONFIG, TINY_TRAINING, TRAIN_CONFIG

EVALUATE_CONFIG = TRAIN_CONFIG.replace("train.yaml", "evaluate.yaml")


def run_evaluation(dataset_dir, datalist, output_dir, **overrides) -> ConfigWorkflow:
    """The evaluation config, layered on the tiny training settings, run on the fold trained into `output_dir`."""
    workflow = ConfigWorkflow(
        config_file=[TRAIN_CONFIG, EVALUATE_CONFIG],
        workflow_type="infer",
        **TINY_TRAINING | overrides,
        dataset_dir=str(dataset_dir),
        datalist=str(datalist),
        output_dir=str(output_dir),
    )
    workflow.initialize()
    workflow.run()
    return workflow


def test_evaluates_the_folds_validation_cases_on_their_own_grid(trained_fold, synthetic_dataset, synthetic_datalist):
    train_workflow, output_dir = trained_fold
    run_evaluation(synthetic_dataset, synthetic_datalist, output_dir)

    validation = train_workflow.parser.get_parsed_content("fold_split")[1]
    evaluation_dir = output_dir / "evaluation"
    for case in validation:
        prediction = nib.load(evaluation_dir / "predictions" / f"{case['case']}.nii.gz")
        reference = nib.load(case["image"][0])
        assert prediction.shape == reference.shape
        np.testing.assert_allclose(prediction.affine, reference.affine)
        assert prediction.get_data_dtype() == np.uint8
        assert set(np.unique(np.asanyarray(prediction.dataobj))) <= {0, 1, 2, 3}

    with open(evaluation_dir / "metrics_per_case.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert tuple(rows[0]) == PER_CASE_COLUMNS
    assert {row["case"] for row in rows} == {case["case"] for case in validation}
    assert sorted({row["region"] for row in rows}) == ["ET", "TC", "WT"]

    summary = json.loads((evaluation_dir / "summary.json").read_text())
    assert summary["num_cases"] == len(validation)
    assert (evaluation_dir / "summary.csv").is_file()
    # The post-processing the label maps had, for scripts.tune_postprocessing: none, evaluation's default.
    inference = json.loads((evaluation_dir / "inference.json").read_text())
    assert inference["settings"] == {"min_component_voxels": 0, "min_et_fraction": 0.0}

    # The report lists every validation case and draws each (two cases, fewer than the three worst) over its images.
    report = (evaluation_dir / "report.md").read_text()
    every_case = report.split("## Every case, worst first", 1)[1]
    assert {case["case"] for case in validation} == {
        line.split("|")[2].strip() for line in every_case.splitlines() if line.startswith("| ") and "rank" not in line
    }
    for case in validation:
        assert f"![{case['case']}](overlays/{case['case']}.png)" in report
        assert (evaluation_dir / "overlays" / f"{case['case']}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (evaluation_dir / "boxplots.png").is_file()


def test_evaluation_predicts_exactly_what_inference_does(trained_fold, synthetic_dataset, synthetic_datalist, tmp_path):
    """Cross-validation measures inference itself: the same pipeline definitions, and the same label maps for the same
    checkpoint and quality options (mirror test-time augmentation, brain crop, post-processing)."""
    train_workflow, output_dir = trained_fold
    options = {"mirror_axes": [0, 1], "min_component_voxels": 5, "min_et_fraction": 0.1}
    evaluation = run_evaluation(
        synthetic_dataset, synthetic_datalist, output_dir, **options, evaluation_dir=str(tmp_path / "evaluation")
    )

    inference_config = ConfigParser.load_config_file(INFERENCE_CONFIG)
    for pipeline_id in ("preprocessing", "inferer", "postprocessing", "networks"):
        assert evaluation.parser.get(pipeline_id) == inference_config[pipeline_id], pipeline_id

    validation = train_workflow.parser.get_parsed_content("fold_split")[1]
    cases_dir = tmp_path / "cases"
    cases_dir.mkdir()
    for case in validation:
        (cases_dir / case["case"]).symlink_to(os.path.dirname(case["image"][0]))
    inference = ConfigWorkflow(
        config_file=INFERENCE_CONFIG,
        workflow_type="infer",
        **{
            name: TINY_TRAINING[name]
            for name in ("spacing", "roi_size", "val_roi_size", "feature_size", "sw_batch_size")
        },
        **options,
        checkpoints=[str(output_dir / "model.pt")],
        dataset_dir=str(cases_dir),
        output_dir=str(tmp_path / "inference"),
    )
    inference.initialize()
    inference.run()
    for case in validation:
        evaluated = nib.load(tmp_path / "evaluation" / "predictions" / f"{case['case']}.nii.gz")
        inferred = nib.load(tmp_path / "inference" / f"{case['case']}.nii.gz")
        np.testing.assert_array_equal(np.asanyarray(evaluated.dataobj), np.asanyarray(inferred.dataobj))
        np.testing.assert_array_equal(evaluated.affine, inferred.affine)


def test_evaluation_runs_inferences_speed_options_unless_a_model_config_sets_its_own():
    """Evaluation times and scores inference as it runs on this device (its window, precision, batch of windows);
    a model config layered last (the 2D U-Net's) keeps its own window."""
    inference = ConfigParser.load_config_file(INFERENCE_CONFIG)
    evaluation = ConfigParser()
    evaluation.read_config([TRAIN_CONFIG, EVALUATE_CONFIG])
    evaluation.parse()
    options = (
        "val_roi_size",
        "sw_batch_size",
        "precision",
        "channels_last",
        "attention_windows",
        "flash_attention",
        "num_workers",
        "return_freed_memory",
        "threads",
        "backend",
        "openvino_cache_dir",
    )
    for option in options:
        assert evaluation.get(option) == inference[option], option
    unet2d_config = TRAIN_CONFIG.replace("train.yaml", "unet2d.yaml")
    unet2d = ConfigParser()
    unet2d.read_config([TRAIN_CONFIG, EVALUATE_CONFIG, unet2d_config])
    unet2d.parse()
    assert unet2d.get("val_roi_size") == ConfigParser.load_config_file(unet2d_config)["val_roi_size"]
