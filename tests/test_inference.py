"""Inference (configs/inference.yaml, scripts/inference.py): submission-ready label maps on each input's
own grid and header, bad cases reported and skipped, reruns, mirror TTA and ensembles, post-processing
and checkpoint loading."""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import weakref
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigWorkflow
from monai.data import MetaTensor
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.networks.nets import SwinUNETR
from monai.optimizers import WarmupCosineSchedule
from monai.transforms import Compose, CropForegroundd, Invertd

import scripts.inference as inference
from scripts.atomic import is_temporary
from scripts.cases import MODALITIES, case_file_name
from scripts.checkpoints import load_network_weights
from scripts.errors import DEBUG_VARIABLE, InputError, find_bundle_error
from scripts.evaluate import evaluate_folders
from scripts.inference import (
    EnsembleInferer,
    autocast_dtype,
    cases_in_folder,
    chunk_window_attention,
    write_label_like,
)
from scripts.labels import get_scheme
from scripts.openvino_network import OpenVINONetwork
from scripts.postprocess import BrainMaskd, MaskOutsideInputd, RemoveSmallComponentsd, SmallEnhancingToNecrosisd
from scripts.synthetic import make_case
from tests.conftest import (
    INFERENCE_CONFIG,
    REPOSITORY,
    SMALL_SHAPE,
    TINY_FEATURE_SIZE,
    TINY_TRAINING,
    kill_while_writing,
    leave_a_temporary,
)

# No post-processing file (models/postprocessing.json, scripts.tune_postprocessing) of the checkout is read.
TINY_INFERENCE = {name: TINY_TRAINING[name] for name in ("spacing", "roi_size", "val_roi_size", "sw_batch_size")} | {
    "postprocessing_file": None
}
# Where the network does not matter (geometry, bad cases, reruns) a 1x1x1 convolution stands in for
# Swin UNETR: with DETECTOR weights it marks TC and ET where the z-scored T1c is bright and WT where
# FLAIR is: a crude tumour detector, enough to show a mirrored or misplaced output.
POINTWISE_NETWORK = {"_target_": "torch.nn.Conv3d", "in_channels": 4, "out_channels": 3, "kernel_size": 1}
DETECTOR = [("t1c", 1.5), ("t2f", 1.3), ("t1c", 1.5)]  # per region TC, WT, ET: (modality, z threshold)
CASES = {"brats": "BraTS-PED-00101-000", "ras": "BraTS-PED-00102-000", "anisotropic": "BraTS-PED-00103-000"}
LABELS = {0, 1, 2, 3}


def nifti(data: np.ndarray, affine: np.ndarray, qform_code: int = 1, sform_code: int = 1) -> nib.Nifti1Image:
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=qform_code)
    image.set_sform(affine, code=sform_code)
    return image


def save_case(root: Path, case_id: str, images: dict[str, nib.Nifti1Image]) -> Path:
    """Write `images` ({modality: image}) as a case folder in the BraTS layout."""
    case_dir = root / case_id
    case_dir.mkdir(parents=True)
    for modality, image in images.items():
        nib.save(image, case_dir / case_file_name(case_id, modality))
    return case_dir


def detector_state(scale: float = 8.0) -> dict[str, torch.Tensor]:
    weight, bias = torch.zeros(3, 4, 1, 1, 1), torch.zeros(3)
    for region, (modality, threshold) in enumerate(DETECTOR):
        weight[region, MODALITIES.index(modality)] = scale
        bias[region] = -scale * threshold
    return {"weight": weight, "bias": bias}


def inference_workflow(
    output_dir: Path, checkpoints: list[Path], network_def: dict | None = POINTWISE_NETWORK, **overrides
) -> ConfigWorkflow:
    """inference.yaml as `monai.bundle run` builds it with the tiny settings; `network_def` None keeps
    the config's Swin UNETR."""
    settings = {**TINY_INFERENCE, **({"network_def": network_def} if network_def else {})}
    settings.update(output_dir=str(output_dir), checkpoints=[str(path) for path in checkpoints], **overrides)
    workflow = ConfigWorkflow(config_file=INFERENCE_CONFIG, workflow_type="infer", **settings)
    workflow.initialize()
    assert workflow.check_properties() == []
    return workflow


def run_inference(output_dir: Path, checkpoints: list[Path], **overrides) -> dict:
    """The summary that CasePredictor.run returns."""
    (summary,) = inference_workflow(output_dir, checkpoints, **overrides).run()
    return summary


def label_data(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


# Everything that places the voxels in space: the BraTS validator compares these with the input.
GRID_FIELDS = ("dim", "pixdim", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d")
GRID_FIELDS += ("qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z", "xyzt_units")


def assert_label_map_on_grid_of(output: Path, reference: Path, labels: set[int] = LABELS) -> None:
    """uint8 `labels` with exactly the reference's shape, affine, qform and sform (matrices and codes)."""
    out, ref = nib.load(output), nib.load(reference)
    assert out.shape == ref.shape
    assert out.get_data_dtype() == np.uint8
    assert set(np.unique(np.asanyarray(out.dataobj)).tolist()) <= labels
    np.testing.assert_array_equal(out.affine, ref.affine)
    for field in GRID_FIELDS:
        np.testing.assert_array_equal(out.header[field], ref.header[field], err_msg=field)
    np.testing.assert_array_equal(out.get_qform(), ref.get_qform())
    np.testing.assert_array_equal(out.get_sform(), ref.get_sform())


def assert_same_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], expected[key]) for key in expected)  # much faster than assert_close


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="session")
def source_case() -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """One synthetic case with enhancing tumour on the small BraTS-like grid: (images, seg, affine)."""
    return make_case(7, SMALL_SHAPE, with_et=True)


@pytest.fixture(scope="session")
def geometry_dataset(source_case, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A folder with the same case on three grids, and {variant: (t1c path, seg image)}:
    brats: the BraTS grid (LPS, qform and sform code 1); ras: reoriented to RAS by nibabel (qform code 0,
    sform code 2);
    anisotropic: every other axial slice with twice the slice spacing, qform only (sform code 0)."""
    images, seg, affine = source_case
    thick = affine.copy()
    thick[:3, 2] *= 2
    variants = {
        "brats": ({m: nifti(images[m], affine) for m in MODALITIES}, nifti(seg, affine)),
        "ras": (
            {m: nib.as_closest_canonical(nifti(images[m], affine)) for m in MODALITIES},
            nib.as_closest_canonical(nifti(seg, affine)),
        ),
        "anisotropic": (
            {m: nifti(images[m][..., ::2], thick, sform_code=0) for m in MODALITIES},
            nifti(seg[..., ::2], thick, sform_code=0),
        ),
    }
    root = tmp_path_factory.mktemp("geometry_cases")
    cases = {}
    for variant, (volumes, seg_image) in variants.items():
        case_dir = save_case(root, CASES[variant], volumes)
        cases[variant] = (case_dir / case_file_name(CASES[variant], "t1c"), seg_image)
    return root, cases


@pytest.fixture(scope="session")
def brats_dataset(geometry_dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding only the BraTS-grid case (linked), for single-case runs."""
    root = tmp_path_factory.mktemp("brats_case")
    os.symlink(geometry_dataset[1]["brats"][0].parent, root / CASES["brats"])
    return root


@pytest.fixture(scope="session")
def detector_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("detector") / "detector.pt"
    torch.save(detector_state(), path)
    return path


@pytest.fixture(scope="session")
def geometry_predictions(geometry_dataset, detector_checkpoint, tmp_path_factory) -> tuple[Path, dict]:
    """One run of the config over the geometry cases: (output folder, summary)."""
    output_dir = tmp_path_factory.mktemp("geometry_predictions")
    summary = run_inference(output_dir, [detector_checkpoint], dataset_dir=str(geometry_dataset[0]))
    return output_dir, summary


@pytest.mark.parametrize("variant", CASES)
def test_output_is_a_label_map_on_the_grid_and_header_of_the_t1c(variant, geometry_dataset, geometry_predictions):
    output_dir, summary = geometry_predictions
    assert summary["written"] == len(CASES) and not summary["failed"]
    assert sorted(os.listdir(output_dir)) == sorted(f"{case}.nii.gz" for case in CASES.values())
    assert_label_map_on_grid_of(output_dir / f"{CASES[variant]}.nii.gz", geometry_dataset[1][variant][0])


@pytest.mark.parametrize("variant", CASES)
def test_labels_land_on_the_tumour(variant, geometry_dataset, geometry_predictions):
    """The detector's whole tumour and enhancing tumour overlap the truth on the input's own grid."""
    seg = np.asanyarray(geometry_dataset[1][variant][1].dataobj)
    label = label_data(geometry_predictions[0] / f"{CASES[variant]}.nii.gz")
    assert dice(label > 0, seg > 0) > 0.85  # mirrored along any axis: < 0.75
    # The synthetic ET is thin or patchy and partly averaged away on this coarse grid (about 3.75 mm): a threshold
    # on T1c finds part of it, and a mirrored or shifted map would find almost none.
    assert dice(label == 3, seg == 3) > 0.35


def test_reoriented_input_gets_the_same_segmentation_reoriented(geometry_predictions):
    brats = nib.load(geometry_predictions[0] / f"{CASES['brats']}.nii.gz")
    ras = nib.load(geometry_predictions[0] / f"{CASES['ras']}.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(ras.dataobj), np.asanyarray(nib.as_closest_canonical(brats).dataobj))


def test_testing_list_of_a_datalist_with_a_swin_unetr_checkpoint(geometry_dataset, tiny_swin_checkpoint, tmp_path):
    """The documented command: Swin UNETR from a best-model file, cases from a datalist's `testing` list."""
    root, cases = geometry_dataset
    images = [os.path.relpath(cases["brats"][0].parent / case_file_name(CASES["brats"], m), root) for m in MODALITIES]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [], "testing": [{"image": images}]}))
    output_dir = tmp_path / "predictions"
    workflow = inference_workflow(
        output_dir,
        [tiny_swin_checkpoint],
        dataset_dir=str(root),
        datalist=str(datalist),
        network_def=None,
        feature_size=TINY_FEATURE_SIZE,
    )
    assert isinstance(workflow.parser.get_parsed_content("network"), SwinUNETR)
    (summary,) = workflow.run()
    assert summary["written"] == 1 and not summary["failed"]
    assert os.listdir(output_dir) == [f"{CASES['brats']}.nii.gz"]
    assert_label_map_on_grid_of(output_dir / f"{CASES['brats']}.nii.gz", cases["brats"][0])


# With workers, cases are read and preprocessed in other processes while the network runs: the same outcomes.
@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_cases_are_reported_and_skipped(num_workers, source_case, detector_checkpoint, tmp_path, caplog):
    images, _, affine = source_case
    volumes = {m: nifti(images[m], affine) for m in MODALITIES}
    data = tmp_path / "data"
    good = "BraTS-PED-00201-000"
    save_case(data, good, volumes)
    missing = save_case(data, "BraTS-PED-00202-000", {m: volumes[m] for m in MODALITIES if m != "t2w"})
    truncated = save_case(data, "BraTS-PED-00203-000", volumes) / case_file_name("BraTS-PED-00203-000", "t1n")
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    shifted = affine.copy()
    shifted[:3, 3] += 4.0
    mismatched = save_case(data, "BraTS-PED-00204-000", {**volumes, "t2f": nifti(images["t2f"], shifted)})
    with_nan = images["t1c"].copy()
    with_nan[10, 20, 5] = np.nan
    nan_case = save_case(data, "BraTS-PED-00205-000", {**volumes, "t1c": nifti(with_nan, affine)})
    zero_case = save_case(data, "BraTS-PED-00206-000", {**volumes, "t1n": nifti(np.zeros_like(images["t1n"]), affine)})
    expected = {
        "BraTS-PED-00202-000": (missing / case_file_name("BraTS-PED-00202-000", "t2w"), "missing"),
        "BraTS-PED-00203-000": (truncated, "unreadable"),
        "BraTS-PED-00204-000": (mismatched / case_file_name("BraTS-PED-00204-000", "t2f"), "affine differs"),
        "BraTS-PED-00205-000": (nan_case / case_file_name("BraTS-PED-00205-000", "t1c"), "1 non-finite voxels"),
        "BraTS-PED-00206-000": (zero_case / case_file_name("BraTS-PED-00206-000", "t1n"), "all voxels are zero"),
    }
    output_dir = tmp_path / "predictions"
    workflow = inference_workflow(output_dir, [detector_checkpoint], dataset_dir=str(data), num_workers=num_workers)
    logger = logging.getLogger("scripts.inference")
    logger.addHandler(caplog.handler)  # the config's logging setup replaces the root handlers
    try:
        with pytest.raises(SystemExit) as exit_info:
            workflow.run()
    finally:
        logger.removeHandler(caplog.handler)

    report = exit_info.value.code
    assert isinstance(report, str) and report.startswith("failed cases:")  # a message exits with status 1
    lines = report.splitlines()[1:]
    assert len(lines) == len(expected)
    for line, (case, (path, reason)) in zip(sorted(lines), sorted(expected.items()), strict=True):
        assert line.startswith(f"{case}: {path}: {reason}")
    assert "1 written, 0 already present (skipped), 5 failed" in caplog.text
    assert os.listdir(output_dir) == [f"{good}.nii.gz"]  # nothing partial or temporary
    assert_label_map_on_grid_of(output_dir / f"{good}.nii.gz", data / good / case_file_name(good, "t1c"))


def test_debug_logs_the_traceback_of_a_failed_case(source_case, detector_checkpoint, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv(DEBUG_VARIABLE, "")  # the variable --debug sets, as it was before this test
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    images, _, affine = source_case
    with_nan = images["t1c"].copy()
    with_nan[10, 20, 5] = np.nan
    volumes = {m: nifti(images[m], affine) for m in MODALITIES} | {"t1c": nifti(with_nan, affine)}
    save_case(tmp_path / "data", "BraTS-PED-00205-000", volumes)
    logger = logging.getLogger("scripts.inference")
    tracebacks = {}
    for debug in (False, True):
        workflow = inference_workflow(
            tmp_path / str(debug), [detector_checkpoint], dataset_dir=str(tmp_path / "data"), debug=debug
        )
        caplog.clear()
        logger.addHandler(caplog.handler)  # the config's logging setup replaces the root handlers
        try:
            with pytest.raises(SystemExit, match="BraTS-PED-00205-000: .*1 non-finite voxels"):
                workflow.run()
        finally:
            logger.removeHandler(caplog.handler)
        tracebacks[debug] = [record for record in caplog.records if record.exc_info]
    assert tracebacks[False] == []
    (record,) = tracebacks[True]
    assert record.message.startswith("BraTS-PED-00205-000: traceback")
    assert isinstance(find_bundle_error(record.exc_info[1]), InputError)  # MONAI wraps it in a RuntimeError


def test_worker_processes_predict_what_the_main_process_does(geometry_dataset, detector_checkpoint, tmp_path):
    dataset_dir, _ = geometry_dataset
    summaries = {
        workers: run_inference(
            tmp_path / str(workers), [detector_checkpoint], dataset_dir=str(dataset_dir), num_workers=workers
        )
        for workers in (0, 2)
    }
    assert summaries[0]["written"] == summaries[2]["written"] == len(os.listdir(tmp_path / "0")) > 1
    for name in os.listdir(tmp_path / "0"):
        np.testing.assert_array_equal(label_data(tmp_path / "2" / name), label_data(tmp_path / "0" / name))


def test_rerun_skips_written_cases_unless_overwrite(geometry_dataset, brats_dataset, detector_checkpoint, tmp_path):
    output = tmp_path / "predictions" / f"{CASES['brats']}.nii.gz"
    assert run_inference(output.parent, [detector_checkpoint], dataset_dir=str(brats_dataset))["written"] == 1
    content, labels = output.read_bytes(), label_data(output)
    os.utime(output, ns=(10**18, 10**18))

    summary = run_inference(output.parent, [detector_checkpoint], dataset_dir=str(brats_dataset))
    assert (summary["written"], summary["skipped_existing"]) == (0, 1)
    assert output.stat().st_mtime_ns == 10**18 and output.read_bytes() == content

    summary = run_inference(output.parent, [detector_checkpoint], dataset_dir=str(brats_dataset), overwrite=True)
    assert (summary["written"], summary["skipped_existing"]) == (1, 0)
    assert output.stat().st_mtime_ns != 10**18
    np.testing.assert_array_equal(label_data(output), labels)


def test_probabilities_are_saved_on_the_input_grid_beside_the_label_map(brats_dataset, detector_checkpoint, tmp_path):
    predictions, probabilities_dir = tmp_path / "predictions", tmp_path / "probabilities"
    run_inference(predictions, [detector_checkpoint], dataset_dir=str(brats_dataset))
    assert not probabilities_dir.exists()  # only when asked for

    summary = run_inference(
        predictions, [detector_checkpoint], dataset_dir=str(brats_dataset), probabilities_dir=str(probabilities_dir)
    )
    assert summary["written"] == 1  # the label map was there, its probabilities were not: the case is redone
    case = CASES["brats"]
    saved = np.load(probabilities_dir / f"{case}.npz")
    reference = nib.load(brats_dataset / case / case_file_name(case, "t1c"))
    probabilities = saved["probabilities"]
    assert probabilities.dtype == np.float16 and probabilities.shape == (3, *reference.shape)
    assert list(saved["regions"]) == ["TC", "WT", "ET"]
    np.testing.assert_array_equal(saved["affine"], reference.affine)
    assert 0 <= probabilities.min() and probabilities.max() <= 1 and 0 < probabilities.mean() < 1
    # Thresholded as the post-processing does, they give the label map written beside them (except where float16
    # rounding may have moved a probability across 0.5).
    labels = get_scheme("brats2023_ped").regions_to_labels(probabilities.astype(np.float32) >= 0.5)[0]
    decided = (np.abs(probabilities.astype(np.float32) - 0.5) > 1e-3).all(axis=0)
    assert decided.mean() > 0.99
    np.testing.assert_array_equal(labels[decided], label_data(predictions / f"{case}.nii.gz")[decided])

    summary = run_inference(
        predictions, [detector_checkpoint], dataset_dir=str(brats_dataset), probabilities_dir=str(probabilities_dir)
    )
    assert (summary["written"], summary["skipped_existing"]) == (0, 1)


def test_crop_to_brain_off_gives_the_same_grid_and_labels(
    geometry_dataset, geometry_predictions, brats_dataset, detector_checkpoint, tmp_path
):
    """Without the crop the sliding window covers the whole grid; the pointwise network gives the same labels."""
    workflow = inference_workflow(
        tmp_path / "predictions", [detector_checkpoint], dataset_dir=str(brats_dataset), crop_to_brain=False
    )
    assert not any(isinstance(transform, CropForegroundd) for transform in workflow.preprocessing.transforms)
    workflow.run()
    output = tmp_path / "predictions" / f"{CASES['brats']}.nii.gz"
    assert_label_map_on_grid_of(output, geometry_dataset[1]["brats"][0])
    cropped = label_data(geometry_predictions[0] / f"{CASES['brats']}.nii.gz")
    np.testing.assert_array_equal(label_data(output), cropped)


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(geometry_dataset, tmp_path, monkeypatch):
    reference = geometry_dataset[1]["brats"][0]
    output = tmp_path / "case.nii.gz"
    write_label_like(np.ones(SMALL_SHAPE, dtype=np.uint8), reference, output)
    previous = output.read_bytes()

    def interrupted_save(image, path):
        Path(path).write_bytes(b"\x1f\x8b partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(nib, "save", interrupted_save)
    with pytest.raises(OSError, match="No space"):
        write_label_like(np.zeros(SMALL_SHAPE, dtype=np.uint8), reference, output)
    assert os.listdir(tmp_path) == ["case.nii.gz"] and output.read_bytes() == previous
    with pytest.raises(ValueError, match="shape"):
        write_label_like(np.zeros((2, 2, 2), dtype=np.uint8), reference, tmp_path / "other.nii.gz")


# Mirror TTA and ensembles.


def small_networks(count: int) -> list[torch.nn.Module]:
    """Random 3x3x3 convolutions: not flip-equivariant, so every mirrored pass differs."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return [torch.nn.Conv3d(4, 3, kernel_size=3, padding=1).eval() for _ in range(count)]


def test_mirror_tta_is_the_mean_of_the_eight_flipped_predictions():
    (network,) = small_networks(1)
    image = torch.randn(1, 4, 6, 7, 8)
    flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    with torch.no_grad():
        passes = [torch.sigmoid(network(image.flip(dims))).flip(dims) for dims in flips]
        single = torch.sigmoid(network(image))
        tta = EnsembleInferer(SimpleInferer(), mirror_axes=[0, 1, 2])(image, network)
    torch.testing.assert_close(tta, torch.stack(passes).mean(0))
    assert not torch.allclose(tta, single, atol=1e-3)
    with torch.no_grad():
        first_axis = EnsembleInferer(SimpleInferer(), mirror_axes=[0])(image, network)
    torch.testing.assert_close(first_axis, (passes[0] + passes[1]) / 2)


def test_ensemble_is_the_mean_of_the_single_model_probabilities():
    first, second = small_networks(2)
    image = torch.randn(1, 4, 6, 7, 8)
    with torch.no_grad():
        ensemble = EnsembleInferer(SimpleInferer(), networks=[first, second])(image)
        expected = (torch.sigmoid(first(image)) + torch.sigmoid(second(image))) / 2
    torch.testing.assert_close(ensemble, expected)


def test_mirror_axes_are_spatial_axes():
    with pytest.raises(ValueError, match="mirror_axes"):
        EnsembleInferer(SimpleInferer(), mirror_axes=[3])


@pytest.mark.parametrize(
    ("precision", "device_type", "native_bf16", "expected"),
    [
        ("auto", "cpu", True, torch.bfloat16),
        ("auto", "cpu", False, None),
        ("auto", "cuda", False, torch.float16),
        ("fp32", "cpu", True, None),
        ("bf16", "cpu", False, torch.bfloat16),
        ("fp16", "cuda", True, torch.float16),
    ],
)
def test_precision_auto_is_bf16_only_on_cpus_with_native_bf16(precision, device_type, native_bf16, expected):
    assert autocast_dtype(precision, device_type, native_bf16) == expected


def test_precision_auto_asks_this_cpu(monkeypatch):
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    assert autocast_dtype("auto", "cpu") is None
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    assert autocast_dtype("auto", "cpu") == torch.bfloat16


def test_unknown_precision_is_refused_when_the_inferer_is_made():
    with pytest.raises(ValueError, match="precision"):
        EnsembleInferer(SimpleInferer(), precision="int8")


def swin_window_outputs(**levers) -> torch.Tensor:
    """Probabilities of a seeded tiny Swin UNETR for one random window, through EnsembleInferer with `levers`."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        network = SwinUNETR(in_channels=4, out_channels=3, feature_size=TINY_FEATURE_SIZE).eval()
        image = torch.randn(1, 4, 64, 64, 64)
    with torch.no_grad():
        return EnsembleInferer(SimpleInferer(), **levers)(image, network)


def test_levers_keep_the_probabilities_float32_and_close_to_the_reference():
    reference = swin_window_outputs()
    for levers, tolerance in [({"channels_last": True}, 1e-5), ({"precision": "bf16"}, 0.03)]:
        probabilities = swin_window_outputs(**levers)
        assert probabilities.dtype == torch.float32
        torch.testing.assert_close(probabilities, reference, rtol=0, atol=tolerance)
    assert not torch.equal(swin_window_outputs(precision="bf16"), reference)  # bf16 did run


def test_openvino_backend_computes_torchs_probabilities():
    reference = swin_window_outputs()
    probabilities = swin_window_outputs(backend="openvino")
    assert probabilities.dtype == torch.float32 and not torch.equal(probabilities, reference)  # OpenVINO did run
    torch.testing.assert_close(probabilities, reference, rtol=0, atol=1e-4)
    in_bf16 = swin_window_outputs(backend="openvino", precision="bf16")
    torch.testing.assert_close(in_bf16, reference, rtol=0, atol=0.03)
    if inference.cpu_has_native_bf16():  # elsewhere OpenVINO computes in fp32 whatever the hint
        assert not torch.equal(in_bf16, probabilities)


def test_openvino_backend_follows_weights_loaded_into_the_same_network(caplog):
    """As under MONAI Label, which loads another model file into the network it hands the inferer; three windows in
    batches of two: the last batch of one runs through the same converted model."""
    torch.manual_seed(0)
    network = torch.nn.Conv3d(4, 3, kernel_size=3, padding=1).eval()
    image = torch.randn(1, 4, 32, 16, 16)
    window = SlidingWindowInferer(roi_size=16, sw_batch_size=2, overlap=0.5)
    openvino = EnsembleInferer(window, backend="openvino")
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="scripts.openvino_network"):
        first = openvino(image, network)
        torch.testing.assert_close(first, EnsembleInferer(window)(image, network), rtol=0, atol=1e-5)
        network.load_state_dict({name: -value for name, value in network.state_dict().items()})
        second = openvino(image, network)
        torch.testing.assert_close(second, EnsembleInferer(window)(image, network), rtol=0, atol=1e-5)
        torch.testing.assert_close(second, 1 - first, rtol=0, atol=1e-5)  # sigmoid(-x): the new weights ran
        openvino(image, network)
    compiled = [record for record in caplog.records if "converted and compiled" in record.message]
    assert len(compiled) == 2 and all("for windows of [16, 16, 16]" in record.message for record in compiled)


def test_openvino_backend_lets_go_of_a_network_no_longer_handed_in():
    """MONAI Label may hand the inferer a new network object: the old one and its OpenVINO model are not kept."""
    image = torch.randn(1, 4, 16, 16, 16)
    inferer = EnsembleInferer(SimpleInferer(), backend="openvino")
    first = torch.nn.Conv3d(4, 3, kernel_size=1).eval()
    with torch.no_grad():
        inferer(image, first)
        gone = weakref.ref(first)
        del first
        inferer(image, torch.nn.Conv3d(4, 3, kernel_size=1).eval())
    gc.collect()
    assert gone() is None


def test_openvino_cache_folder_keeps_the_converted_network_for_later_runs(tmp_path, caplog):
    torch.manual_seed(0)
    network = torch.nn.Conv3d(4, 3, kernel_size=3, padding=1).eval()
    image = torch.randn(1, 4, 16, 16, 16)
    killed = leave_a_temporary(tmp_path / "model.xml")

    def run() -> tuple[torch.Tensor, str]:
        """A new wrapper, as in a new process: (output, how the model was made)."""
        caplog.clear()
        with torch.no_grad(), caplog.at_level(logging.INFO, logger="scripts.openvino_network"):
            output = OpenVINONetwork(network, cache_dir=tmp_path)(image)
        return output, caplog.text

    def kept() -> list[str]:
        return sorted(path.name for path in tmp_path.iterdir() if path.suffix in (".xml", ".bin"))

    first, made = run()
    assert "network converted into" in made and not killed.exists()
    (stem,) = {name.rsplit(".", 1)[0] for name in kept()}
    assert kept() == [f"{stem}.bin", f"{stem}.xml"]
    again, made = run()
    assert f"network read from {tmp_path / stem}.xml" in made and torch.equal(again, first)
    assert len(list(tmp_path.glob("*.blob"))) == 1  # OpenVINO's compiled model: the first run's, loaded again
    (tmp_path / f"{stem}.xml").write_text("damaged")
    again, made = run()
    assert "could not read" in made and "network converted into" in made and torch.equal(again, first)
    assert kept() == [f"{stem}.bin", f"{stem}.xml"]
    network.load_state_dict({name: -value for name, value in network.state_dict().items()})
    other, made = run()
    assert "network converted into" in made and len(kept()) == 4  # other weights: another model beside the first
    torch.testing.assert_close(other, -first, rtol=0, atol=1e-5)


def test_openvino_backend_writes_the_labels_of_the_torch_backend(brats_dataset, detector_checkpoint, tmp_path):
    for backend in ("torch", "openvino"):
        summary = run_inference(
            tmp_path / backend, [detector_checkpoint], dataset_dir=str(brats_dataset), backend=backend, precision="fp32"
        )
        assert summary["written"] == 1 and summary["failed"] == []
    labels = {backend: label_data(tmp_path / backend / f"{CASES['brats']}.nii.gz") for backend in ("torch", "openvino")}
    assert np.count_nonzero(labels["torch"]) > 0
    assert np.mean(labels["openvino"] != labels["torch"]) < 1e-5  # a voxel on the threshold may go either way


def test_backend_openvino_without_openvino_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # what an import finds when the package is absent
    with pytest.raises(InputError, match=r"pip install openvino==\d"):
        EnsembleInferer(SimpleInferer(), backend="openvino")
    with pytest.raises(ValueError, match="backend is one of torch, openvino"):
        EnsembleInferer(SimpleInferer(), backend="onnx")


def test_openvino_backend_refuses_windows_off_the_cpu():
    network = OpenVINONetwork(torch.nn.Conv3d(4, 3, kernel_size=1))
    with pytest.raises(RuntimeError, match="runs the network on the CPU, but the windows are on meta"):
        network(torch.zeros(1, 4, 8, 8, 8, device="meta"))


def test_window_attention_in_chunks_gives_the_same_output_to_the_bit():
    torch.manual_seed(0)
    network = SwinUNETR(in_channels=4, out_channels=3, feature_size=TINY_FEATURE_SIZE).eval()
    names = list(network.state_dict())
    # Two images, as windows of a batch: stage 1 has 125 attention windows per image, shifted (masked) and not.
    image = torch.randn(2, 4, 64, 64, 64)
    with torch.no_grad():
        reference = network(image)
        calls = []
        for module in chunk_window_attention(network, 16).modules():
            if hasattr(module, "_forward_all_windows"):
                whole = module._forward_all_windows
                module._forward_all_windows = lambda x, mask, whole=whole: calls.append(len(x)) or whole(x, mask)
        chunked = network(image)
    assert torch.equal(chunked, reference)
    attentions = sum(hasattr(module, "_forward_all_windows") for module in network.modules())
    assert max(calls) <= 2 * 16 and len(calls) > 8 * attentions // 2  # stage 1: 8 chunks of its 125 windows
    assert list(network.state_dict()) == names  # checkpoints load as before
    chunk_window_attention(network, None)
    calls.clear()
    with torch.no_grad():
        assert torch.equal(network(image), reference)
    assert max(calls) == 2 * 125 and len(calls) == attentions  # all windows at once again, as MONAI runs them


def test_config_with_mirror_tta_and_two_checkpoints(geometry_dataset, brats_dataset, detector_checkpoint, tmp_path):
    second = tmp_path / "second.pt"
    torch.save(detector_state(scale=2.0), second)
    workflow = inference_workflow(
        tmp_path / "predictions", [detector_checkpoint, second], dataset_dir=str(brats_dataset), mirror_axes=[0]
    )
    (summary,) = workflow.run()
    assert summary["written"] == 1 and not summary["failed"]
    inferer = workflow.inferer
    assert inferer.flips == [[], [2]]
    for network, path in zip(inferer.networks, [detector_checkpoint, second], strict=True):
        assert_same_state(network.state_dict(), torch.load(path))
        assert not network.training
    output = tmp_path / "predictions" / f"{CASES['brats']}.nii.gz"
    assert_label_map_on_grid_of(output, geometry_dataset[1]["brats"][0])


# Post-processing.


def blob(shape: tuple[int, ...], corner: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(c, c + s) for c, s in zip(corner, size, strict=True))] = True
    return mask


def test_remove_small_components_per_region():
    """Components of 5 and 9 voxels in every region; min_voxels per region [TC 9, WT 0, ET 10]."""
    five, nine = blob((12, 12, 12), (1, 1, 1), (5, 1, 1)), blob((12, 12, 12), (6, 6, 6), (3, 3, 1))
    regions = torch.from_numpy(np.stack([five | nine] * 3).astype(np.float32))
    out = RemoveSmallComponentsd("pred", min_voxels=[9, 0, 10])({"pred": regions})["pred"]
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_array_equal(out[0].numpy() > 0, nine)  # exactly N voxels is kept
    np.testing.assert_array_equal(out[1].numpy() > 0, five | nine)
    assert not out[2].any()
    out = RemoveSmallComponentsd("pred", min_voxels=6)({"pred": regions})["pred"]
    np.testing.assert_array_equal(out.numpy() > 0, np.stack([nine] * 3))


def test_remove_small_components_counts_26_connected_voxels_as_one():
    corners = blob((4, 4, 4), (0, 0, 0), (1, 1, 1)) | blob((4, 4, 4), (1, 1, 1), (1, 1, 1))
    regions = np.stack([corners] * 3).astype(np.uint8)
    np.testing.assert_array_equal(RemoveSmallComponentsd("pred", min_voxels=2)({"pred": regions})["pred"], regions)
    with pytest.raises(ValueError, match="min_voxels"):
        RemoveSmallComponentsd("pred", min_voxels=[1, 2])


def tumour_label(num_enhancing: int, num_whole: int = 100) -> torch.Tensor:
    """(1, 10, 10, 10) label map: `num_whole` tumour voxels, the first `num_enhancing` of them ET, the rest edema."""
    label = torch.zeros(1000, dtype=torch.uint8)
    label[:num_whole] = 2
    label[:num_enhancing] = 3
    return label.reshape(1, 10, 10, 10)


@pytest.mark.parametrize(("num_enhancing", "relabelled"), [(3, True), (4, False), (5, False), (0, False)])
def test_small_enhancing_tumour_becomes_necrosis(num_enhancing, relabelled):
    label = tumour_label(num_enhancing)
    out = SmallEnhancingToNecrosisd("pred", min_fraction=0.04)({"pred": label})["pred"]
    expected = label.clone()
    if relabelled:
        expected[label == 3] = 1
    torch.testing.assert_close(out, expected)
    assert torch.equal(label, tumour_label(num_enhancing))  # the input is not modified


def test_disabled_post_processing_keeps_the_input():
    label = tumour_label(1)
    assert torch.equal(SmallEnhancingToNecrosisd("pred", min_fraction=0.0)({"pred": label})["pred"], label)
    regions = torch.from_numpy(np.stack([blob((6, 6, 6), (2, 2, 2), (1, 1, 1))] * 3).astype(np.float32))
    assert torch.equal(RemoveSmallComponentsd("pred", min_voxels=0)({"pred": regions})["pred"], regions)
    assert torch.equal(RemoveSmallComponentsd("pred", min_voxels=[0, 0, 0])({"pred": regions})["pred"], regions)


def config_labels(regions: np.ndarray, **overrides) -> np.ndarray:
    """The label map that inference.yaml's post-processing makes of region probabilities on the input grid
    (the steps that need the preprocessed image, brain mask and inversion, are left out)."""
    settings = {"postprocessing_file": None, **overrides}
    workflow = ConfigWorkflow(config_file=INFERENCE_CONFIG, workflow_type="infer", **settings)
    workflow.initialize()
    on_input_grid = (Invertd, MaskOutsideInputd)
    after_inversion = Compose([t for t in workflow.postprocessing.transforms if not isinstance(t, on_input_grid)])
    return np.asarray(after_inversion({"pred": MetaTensor(regions.astype(np.float32))})["pred"])[0]


@pytest.mark.parametrize(
    ("overrides", "expected_island", "expected_enhancing"),
    [({}, 2, 3), ({"min_component_voxels": [130, 130, 130]}, 0, 1), ({"min_et_fraction": 0.04}, 2, 1)],
)
def test_config_post_processing_options_change_the_labels(overrides, expected_island, expected_enhancing):
    """Whole tumour of 1000 + 27 voxels (a separate island), core of 216, enhancing of 8 (< 4% of WT)."""
    shape = (24, 24, 24)
    tumour, island = blob(shape, (2, 2, 2), (10, 10, 10)), blob(shape, (18, 18, 18), (3, 3, 3))
    core, enhancing = blob(shape, (4, 4, 4), (6, 6, 6)), blob(shape, (6, 6, 6), (2, 2, 2))
    label = config_labels(np.stack([core, tumour | island, enhancing]), **overrides)
    assert set(np.unique(label[island])) == {expected_island}
    assert set(np.unique(label[enhancing])) == {expected_enhancing}
    assert set(np.unique(label[core & ~enhancing])) == {1}


def test_predictions_outside_the_brain_are_removed():
    image = torch.zeros(4, 5, 5, 5)
    image[:, 1:4, 1:4, 1:4] = torch.randn(4, 3, 3, 3)
    image[0, 0, 0, 0] = 1.0  # one channel nonzero is still inside
    pred = MaskOutsideInputd(keys="pred")({"pred": torch.ones(3, 5, 5, 5), "image": image})["pred"]
    inside = (image != 0).any(0)
    assert torch.equal(pred, inside.expand(3, -1, -1, -1).float())
    assert pred[:, 0, 0, 0].tolist() == [1.0, 1.0, 1.0]
    # The brain mask kept in place of the input: one boolean channel, the same result.
    brain = BrainMaskd(keys="image", names="brain")({"image": image})["brain"]
    assert brain.shape == (1, 5, 5, 5) and brain.dtype == torch.bool
    masked = MaskOutsideInputd(keys="pred", source_key="brain")({"pred": torch.ones(3, 5, 5, 5), "brain": brain})
    assert torch.equal(masked["pred"], pred)


# Checkpoints.


@pytest.fixture(scope="module")
def swin_state(tiny_swin_checkpoint) -> dict[str, torch.Tensor]:
    return torch.load(tiny_swin_checkpoint, weights_only=True)


def swin() -> SwinUNETR:
    return SwinUNETR(in_channels=4, out_channels=3, feature_size=TINY_FEATURE_SIZE)


def test_loads_a_best_model_file(tiny_swin_checkpoint, swin_state):
    network = load_network_weights(swin(), tiny_swin_checkpoint)
    assert_same_state(network.state_dict(), swin_state)


def test_loads_the_network_of_a_full_training_checkpoint(swin_state, tmp_path):
    network = swin()
    network.load_state_dict(swin_state)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    full = {
        "network": swin_state,
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": WarmupCosineSchedule(optimizer, warmup_steps=1, t_total=10).state_dict(),
        "trainer": {"epoch": 3, "iteration": 30, "max_epochs": 300, "epoch_length": 10},
    }
    torch.save(full, tmp_path / "checkpoint_epoch=3.pt")
    loaded = load_network_weights(swin(), tmp_path / "checkpoint_epoch=3.pt")
    assert_same_state(loaded.state_dict(), swin_state)


def test_a_gpu_checkpoint_loads_on_the_cpu(tmp_path, monkeypatch):
    """Storages tagged "cuda:0", as a GPU training run writes them, are mapped to the requested device."""
    state = detector_state()
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, tmp_path / "gpu.pt")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "gpu.pt", weights_only=True)
    network = load_network_weights(torch.nn.Conv3d(4, 3, 1), tmp_path / "gpu.pt", "cpu")
    assert network.weight.device.type == "cpu"
    assert_same_state(network.state_dict(), state)


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_file(tiny_swin_checkpoint):
    with pytest.raises(InputError, match="does not fit this network definition") as error:
        load_network_weights(SwinUNETR(in_channels=4, out_channels=3, feature_size=24), tiny_swin_checkpoint)
    assert str(tiny_swin_checkpoint) in str(error.value)


@pytest.mark.parametrize("defect", ["garbage", "empty", "truncated"])
def test_an_unreadable_checkpoint_is_refused_naming_the_file(defect, tmp_path):
    torch.save(detector_state(), tmp_path / "model.pt")
    content = (tmp_path / "model.pt").read_bytes()
    defects = {"garbage": b"not a checkpoint", "empty": b"", "truncated": content[:400]}
    (tmp_path / "model.pt").write_bytes(defects[defect])
    with pytest.raises(InputError, match="model.pt: unreadable checkpoint"):
        load_network_weights(torch.nn.Conv3d(4, 3, 1), tmp_path / "model.pt")


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_file(tmp_path):
    state = detector_state()
    state["bias"][1] = float("nan")
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(InputError, match=r"model.pt: network weights hold NaN/Inf \(1 tensors, e.g. bias\)"):
        load_network_weights(torch.nn.Conv3d(4, 3, 1), tmp_path / "model.pt")


def test_a_folder_without_cases_is_an_error_naming_each_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=f"no cases in {empty}"):
        cases_in_folder(empty)
    misnamed = tmp_path / "misnamed" / "BraTS2021_00000"
    misnamed.mkdir(parents=True)
    for name in ("flair", "t1", "t1ce", "t2"):
        (misnamed / f"BraTS2021_00000_{name}.nii.gz").write_bytes(b"")
    with pytest.raises(InputError) as caught:
        cases_in_folder(misnamed.parent)
    assert len(caught.value.problems) == 2 and "2018-2021 names" in caught.value.problems[1]
    assert caught.value.problems[1].startswith(f"BraTS2021_00000: {misnamed}: ")


def test_command_line_on_an_empty_folder_fails_in_one_line(detector_checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        inference_command(tmp_path, tmp_path / "empty", tmp_path / "predictions", detector_checkpoint),
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: no cases in {tmp_path / 'empty'}" in result.stderr
    assert not (tmp_path / "predictions").exists() or not os.listdir(tmp_path / "predictions")


def inference_command(tmp_path: Path, dataset_dir: Path, output_dir: Path, checkpoint: Path) -> list[str]:
    """`monai.bundle run` of inference.yaml with the tiny settings and the pointwise network, as a user runs it."""
    tiny = tmp_path / "tiny_inference.yaml"
    tiny.write_text(json.dumps({**TINY_INFERENCE, "network_def": POINTWISE_NETWORK}))
    configs = f"['{INFERENCE_CONFIG}', '{tiny}']"
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs] + [
        *("--dataset_dir", str(dataset_dir), "--output_dir", str(output_dir)),
        *("--checkpoints", f"['{checkpoint}']"),
    ]


def test_killed_mid_write_a_rerun_finishes_the_batch_cleanly(source_case, detector_checkpoint, tmp_path):
    images, seg, affine = source_case
    data = tmp_path / "data"
    case_ids = [f"BraTS-PED-{300 + index:05d}-000" for index in range(8)]
    for case_id in case_ids:
        case_dir = save_case(data, case_id, {m: nifti(images[m], affine) for m in MODALITIES})
        nib.save(nifti(seg, affine), case_dir / case_file_name(case_id, "seg"))
    output_dir = tmp_path / "predictions"
    command = inference_command(tmp_path, data, output_dir, detector_checkpoint)

    writing = kill_while_writing(command, output_dir, "BraTS-PED-*.nii.gz")
    finished = sorted(path.name for path in output_dir.iterdir() if not path.name.startswith("."))
    assert writing not in finished and [path for path in output_dir.iterdir() if is_temporary(path)]
    for name in finished:  # whatever carries a final name is complete
        assert label_data(output_dir / name).shape == seg.shape

    rerun = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(case_ids) - len(finished)} written, {len(finished)} already present" in rerun.stdout + rerun.stderr
    assert sorted(os.listdir(output_dir)) == [f"{case_id}.nii.gz" for case_id in case_ids]
    summary = evaluate_folders(str(output_dir), str(data), str(tmp_path / "scores"))
    assert summary["num_cases"] == len(case_ids)


def test_a_rerun_with_overwrite_also_removes_leftover_temporaries(brats_dataset, detector_checkpoint, tmp_path):
    output_dir = tmp_path / "predictions"
    leftover = leave_a_temporary(output_dir / f"{CASES['brats']}.nii.gz")
    summary = run_inference(output_dir, [detector_checkpoint], dataset_dir=str(brats_dataset), overwrite=True)
    assert summary["written"] == 1 and not leftover.exists()
    assert os.listdir(output_dir) == [f"{CASES['brats']}.nii.gz"]


def test_small_enhancing_tumour_becomes_the_schemes_non_enhancing_label():
    label = torch.zeros(1, 10, 10, 10, dtype=torch.uint8)
    label[0, :5], label[0, 5:9], label[0, 9, 0, 0] = 4, 2, 1  # 2024: edema, NET, one ET voxel
    relabel = SmallEnhancingToNecrosisd("pred", min_fraction=0.04, label_scheme="brats2024_ped")
    out = relabel({"pred": label})["pred"]
    assert int((out == 1).sum()) == 0 and int((out == 2).sum()) == 401 and int((out == 4).sum()) == 500


def test_a_minimum_size_per_region_must_match_the_schemes_regions():
    with pytest.raises(ValueError, match=r"one per region \['TC', 'WT', 'ET', 'CC'\]"):
        RemoveSmallComponentsd("pred", min_voxels=[10, 10, 10], label_scheme="brats2024_ped")


# How the 2023 labels of the same regions read in the other schemes.
SAME_REGIONS_AS_2023 = {"brats2024_ped": {1: 2, 2: 4, 3: 1}, "brats2021": {1: 1, 2: 2, 3: 4}}


@pytest.mark.parametrize("scheme", SAME_REGIONS_AS_2023)
def test_inference_writes_the_labels_of_the_scheme(
    scheme, geometry_dataset, geometry_predictions, brats_dataset, tmp_path
):
    """The detector through the real config with --label_scheme: the same regions as with the 2023 labels,
    written with the scheme's values on the input grid. For 2024 a fourth, silent channel stands for the cyst."""
    state = detector_state()
    if scheme == "brats2024_ped":
        state = {"weight": F.pad(state["weight"], (0, 0, 0, 0, 0, 0, 0, 0, 0, 1)), "bias": F.pad(state["bias"], (0, 1))}
        state["bias"][3] = -100.0
    checkpoint = tmp_path / "detector.pt"
    torch.save(state, checkpoint)
    network = {**POINTWISE_NETWORK, "out_channels": len(state["bias"])}
    summary = run_inference(
        tmp_path / "out", [checkpoint], dataset_dir=str(brats_dataset), network_def=network, label_scheme=scheme
    )
    assert summary["written"] == 1
    output = tmp_path / "out" / f"{CASES['brats']}.nii.gz"
    assert_label_map_on_grid_of(
        output, geometry_dataset[1]["brats"][0], labels={0, *SAME_REGIONS_AS_2023[scheme].values()}
    )
    label = label_data(output)
    reference = label_data(geometry_predictions[0] / f"{CASES['brats']}.nii.gz")  # 2023 labels
    assert {2, 3} <= set(np.unique(reference).tolist())  # the detector finds no NCR: its TC is its ET
    for value_2023, value in SAME_REGIONS_AS_2023[scheme].items():
        np.testing.assert_array_equal(label == value, reference == value_2023)
