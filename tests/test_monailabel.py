"""What MONAI Label 0.8.5 needs of the bundle, without MONAI Label: its `image_path` entry through preprocessing,
the network it passes in used with one checkpoint, no package beyond MONAI Label's own at inference, and one
4-channel file per case (scripts.stack_modalities) predicted like the four files. `make monailabel-check` runs the
real server (docs/monailabel.md)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import cc3d
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import Spacingd

from scripts.cases import MODALITIES, LoadCaseImaged, case_file_name, case_files, check_case, find_case_dirs
from scripts.errors import InputError
from scripts.inference import cases_in_folder
from scripts.postprocess import without_small_components
from scripts.stack_modalities import stack_dataset
from tests import test_inference
from tests.conftest import INFERENCE_CONFIG, REPOSITORY, SMALL_SHAPE
from tests.test_inference import (
    CASES,
    POINTWISE_NETWORK,
    TINY_INFERENCE,
    assert_label_map_on_grid_of,
    detector_state,
    inference_workflow,
    label_data,
)

# The inference tests' cases and checkpoint, as fixtures of this module too.
source_case = test_inference.source_case
geometry_dataset = test_inference.geometry_dataset
brats_dataset = test_inference.brats_dataset
detector_checkpoint = test_inference.detector_checkpoint


def inference_parser(**overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(INFERENCE_CONFIG)
    parser.update({**TINY_INFERENCE, **overrides})
    return parser


def test_monai_label_image_path_survives_preprocessing(brats_dataset):
    """MONAI Label adds the request's image as the string `image_path`; MONAI 1.6.1's Spacingd updates every
    `image_*` entry as a metadata dict. The preprocessing keeps it aside and gives it back unchanged."""
    (case_dir,) = find_case_dirs(brats_dataset)
    request = {"image": case_files(case_dir)["image"], "image_path": "/studies/case.nii.gz"}
    data = inference_parser().get_parsed_content("preprocessing")(dict(request))
    assert data["image_path"] == request["image_path"] and "request_image_path" not in data
    assert data["image"].shape[0] == len(MODALITIES)

    loaded = LoadCaseImaged(keys="image", ensure_channel_first=True, image_only=False)(dict(request))
    with pytest.raises(AttributeError, match="'str' object has no attribute 'update'"):
        Spacingd(keys="image", pixdim=[4.0, 4.0, 4.0])(loaded)


def test_one_checkpoint_runs_the_network_passed_in_and_an_ensemble_its_own(detector_checkpoint, tmp_path):
    """MONAI Label passes its own network (network_def with the model file it was asked for, reloaded when the file
    changes): with one checkpoint the inferer must use it; `network` is the checkpoint's for command-line runs."""
    # fp32: the comparison below is exact (the default on a CPU with native bf16 is bf16).
    parser = inference_parser(network_def=POINTWISE_NETWORK, checkpoints=[str(detector_checkpoint)], precision="fp32")
    inferer = parser.get_parsed_content("inferer")
    assert inferer.networks == []
    assert all(
        torch.equal(parser.get_parsed_content("network").state_dict()[k], v) for k, v in detector_state().items()
    )

    passed_in = torch.nn.Conv3d(4, 3, kernel_size=1)
    passed_in.load_state_dict(detector_state(scale=2.0))
    image = torch.randn(1, 4, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(inferer(image, passed_in), torch.sigmoid(passed_in(image)))

    second = tmp_path / "second.pt"
    torch.save(detector_state(scale=2.0), second)
    parser = inference_parser(network_def=POINTWISE_NETWORK, checkpoints=[str(detector_checkpoint), str(second)])
    assert len(parser.get_parsed_content("inferer").networks) == 2


def test_inference_config_runs_without_cc3d():
    """MONAI Label installs none of the bundle's packages: the inference chain, small-component removal included,
    must run with what MONAI Label has (cc3d made unimportable here)."""
    code = f"""
import sys
sys.modules["cc3d"] = None
import numpy as np
from monai.bundle import ConfigParser
parser = ConfigParser()
parser.read_config({INFERENCE_CONFIG!r})
parser["min_component_voxels"] = 2
for name in ("preprocessing", "inferer", "postprocessing"):
    parser.get_parsed_content(name)
remove = parser.get_parsed_content("postprocessing").transforms[3]
regions = np.zeros((3, 4, 4, 4), dtype=np.float32)
regions[:, 0, 0, 0] = regions[:, 2, 2, 2] = regions[:, 3, 3, 3] = 1
print(int(remove({{"pred": regions}})["pred"].sum()))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["6"]  # the 26-connected pair kept in all three regions, the single voxel gone


@pytest.mark.parametrize("min_voxels", [2, 5, 30])
def test_small_component_removal_matches_cc3d(min_voxels):
    mask = np.random.default_rng(min_voxels).random((20, 18, 16)) > 0.8
    expected = cc3d.dust(mask, threshold=min_voxels, connectivity=26)
    np.testing.assert_array_equal(without_small_components(mask, min_voxels), expected)


# One 4-channel file per case.


def test_stacked_cases_hold_the_modalities_in_order_on_the_t1c_header(synthetic_dataset, tmp_path):
    summary = stack_dataset(synthetic_dataset, tmp_path / "studies")
    case_dirs = find_case_dirs(synthetic_dataset)
    assert summary == {"written": len(case_dirs), "skipped_existing": 0, "failed": []}
    case = case_files(case_dirs[0])
    stacked = nib.load(tmp_path / "studies" / f"{case['case']}.nii.gz")
    t1c = nib.load(case["image"][0])
    assert stacked.shape == (*SMALL_SHAPE, len(MODALITIES))
    for index, path in enumerate(case["image"]):
        np.testing.assert_array_equal(np.asanyarray(stacked.dataobj)[..., index], np.asanyarray(nib.load(path).dataobj))
    np.testing.assert_array_equal(stacked.affine, t1c.affine)
    for field in ("qform_code", "sform_code", "xyzt_units"):
        assert stacked.header[field] == t1c.header[field], field
    np.testing.assert_array_equal(stacked.get_qform(), t1c.get_qform())
    assert stack_dataset(synthetic_dataset, tmp_path / "studies")["skipped_existing"] == len(case_dirs)
    assert not [path for path in (tmp_path / "studies").iterdir() if path.name.startswith(".")]


def copy_cases(source: Path, destination: Path, count: int) -> list[Path]:
    copies = []
    for case_dir in find_case_dirs(source)[:count]:
        copies.append(Path(shutil.copytree(case_dir, destination / case_dir.name)))
    return copies


def test_stacking_refuses_missing_files_before_writing_anything(synthetic_dataset, tmp_path):
    first, _ = copy_cases(synthetic_dataset, tmp_path / "data", 2)
    missing = first / case_file_name(first.name, "t2f")
    missing.unlink()
    with pytest.raises(InputError) as error:
        stack_dataset(tmp_path / "data", tmp_path / "studies")
    assert error.value.problems == [f"{first.name}: {missing}: missing"]
    assert not (tmp_path / "studies").exists()


def test_stacking_skips_a_case_with_an_empty_modality_naming_file_and_channel(synthetic_dataset, tmp_path):
    first, second = copy_cases(synthetic_dataset, tmp_path / "data", 2)
    t1n = first / case_file_name(first.name, "t1n")
    nib.save(nib.Nifti1Image(np.zeros(SMALL_SHAPE, np.float32), nib.load(t1n).affine), t1n)
    command = [sys.executable, "-m", "scripts.stack_modalities", "--dataset_dir", str(tmp_path / "data")]
    result = subprocess.run([*command, "--output_dir", str(tmp_path / "studies")], cwd=REPOSITORY, capture_output=True)
    assert result.returncode == 1
    t1c = first / case_file_name(first.name, "t1c")
    assert f"error: {first.name}: {t1c}: channel 1 (t1n): all voxels are zero (empty volume)" in result.stderr.decode()
    assert sorted(path.name for path in (tmp_path / "studies").iterdir()) == [f"{second.name}.nii.gz"]


def test_loading_a_stacked_file_names_an_empty_channel(synthetic_dataset, tmp_path):
    stack_dataset(synthetic_dataset, tmp_path)
    path = sorted(tmp_path.glob("*.nii.gz"))[0]
    image = nib.load(path)
    data = np.asanyarray(image.dataobj).copy()
    data[..., 3] = 0
    nib.save(nib.Nifti1Image(data, image.affine, image.header), path)
    with pytest.raises(InputError) as error:
        LoadCaseImaged(keys="image", ensure_channel_first=True)({"image": [str(path)]})
    case = path.name.removesuffix(".nii.gz")  # the file's own name, not its folder's
    assert error.value.problems == [f"{case}: {path}: channel 3 (t2w): all voxels are zero (empty volume)"]


def test_inference_predicts_a_stacked_case_as_its_four_files(
    geometry_dataset, brats_dataset, detector_checkpoint, tmp_path
):
    stack_dataset(brats_dataset, tmp_path / "studies")
    (tmp_path / "studies" / "notes.txt").write_text("not a case")
    for name, dataset in [("stacked", tmp_path / "studies"), ("separate", brats_dataset)]:
        (summary,) = inference_workflow(tmp_path / name, [detector_checkpoint], dataset_dir=str(dataset)).run()
        assert summary["written"] == 1 and not summary["failed"]
    output = f"{CASES['brats']}.nii.gz"
    t1c = geometry_dataset[1]["brats"][0]
    assert_label_map_on_grid_of(tmp_path / "stacked" / output, t1c)
    stacked, separate = label_data(tmp_path / "stacked" / output), label_data(tmp_path / "separate" / output)
    assert separate.any()
    np.testing.assert_array_equal(stacked, separate)


def test_a_stacked_case_must_hold_four_channels_and_a_single_image_may_be_3d(synthetic_dataset, tmp_path):
    t1c = case_files(find_case_dirs(synthetic_dataset)[0])["image"][0]
    shutil.copy(t1c, tmp_path / "BraTS-PED-09999-000.nii.gz")
    (case,) = cases_in_folder(tmp_path)
    assert case["stacked"] and case["case"] == "BraTS-PED-09999-000"
    assert check_case({**case, "label": None}, check_data=False) == [
        f"BraTS-PED-09999-000: {tmp_path / 'BraTS-PED-09999-000.nii.gz'}: expected one volume of 4 channels "
        f"(t1c, t1n, t2f, t2w) along the fourth axis, got shape {SMALL_SHAPE}"
    ]
    assert check_case({"case": "one", "image": [t1c], "label": None}, check_data=False) == []
