"""The 2D U-Net variant: slice-wise networks on volumes, its training, evaluation and inference through the bundle's
own configs, and the comparison table."""

from __future__ import annotations

import json
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.inferers import SliceInferer, SlidingWindowInferer
from monai.losses import DiceLoss
from monai.networks.nets import BasicUNet

from scripts.compare_models import compare_models
from scripts.errors import InputError
from scripts.slices import CentreSlicesLoss, SliceWise, slice_window
from tests.conftest import INFERENCE_CONFIG, REPOSITORY, TINY_TRAINING, TRAIN_CONFIG

UNET2D_CONFIG = str(REPOSITORY / "configs" / "unet2d.yaml")
EVALUATE_CONFIG = str(REPOSITORY / "configs" / "evaluate.yaml")
TINY_FEATURES = [4, 4, 8, 8, 16, 4]
# The tiny 3D settings without the 3D crop: unet2d.yaml sets its own slice crops and windows.
TINY_2D = {key: value for key, value in TINY_TRAINING.items() if key not in ("roi_size", "val_roi_size")} | {
    "unet_features": TINY_FEATURES,
    "crops_per_case": 3,
}


def tiny_unet(in_channels: int = 4) -> BasicUNet:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return BasicUNet(spatial_dims=2, in_channels=in_channels, out_channels=3, features=TINY_FEATURES).eval()


def test_without_context_it_predicts_what_monais_slice_inferer_does():
    network = tiny_unet()
    volume = torch.randn(1, 4, 32, 48, 7)
    with torch.no_grad():
        ours = SlidingWindowInferer(roi_size=[32, 48, -1], sw_batch_size=1)(volume, SliceWise(network, 0, 3))
        monais = SliceInferer(roi_size=(32, 48), spatial_dim=2, sw_batch_size=1)(volume, network)
    assert ours.shape == (1, 3, 32, 48, 7)
    torch.testing.assert_close(ours, monais, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slices_per_pass", [1, 2, 32])
def test_each_slice_goes_in_with_its_neighbours_as_channels(slices_per_pass):
    volume = torch.arange(2 * 3 * 4 * 5 * 6, dtype=torch.float32).reshape(2, 3, 4, 5, 6)
    stacks = SliceWise(torch.nn.Identity(), context=2, slices_per_pass=slices_per_pass)(volume)
    assert stacks.shape == (2, 3 * 5, 4, 5, 6)
    for z in range(6):
        for offset in range(-2, 3):
            neighbour = min(max(z + offset, 0), 5)  # beyond the ends: the end slice again
            for channel in range(3):
                stacked = stacks[:, channel * 5 + offset + 2, ..., z]
                torch.testing.assert_close(stacked, volume[:, channel, ..., neighbour])


def test_a_2_5d_crop_trains_only_its_centre_slice():
    target = torch.zeros(2, 3, 8, 8, 3)
    target[:, :, 2:6, 2:6, :] = 1
    prediction = torch.full_like(target, -20.0, requires_grad=True)
    with torch.no_grad():
        prediction[:, :, 2:6, 2:6, 1] = 20.0  # right on the centre slice, wrong on both neighbours
    loss = CentreSlicesLoss(DiceLoss(sigmoid=True), context=1)(prediction, target)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert prediction.grad[..., [0, 2]].abs().sum() == 0
    # All three slices counted, the neighbours wrong: Dice 2 * 16 / (16 + 48).
    assert DiceLoss(sigmoid=True)(prediction, target).item() == pytest.approx(0.5, abs=1e-4)
    with pytest.raises(ValueError, match="none with 1 neighbours"):
        CentreSlicesLoss(DiceLoss(sigmoid=True), context=1)(prediction[..., :2], target[..., :2])


def test_the_slice_window_spans_the_field_of_view_in_multiples_of_16():
    assert slice_window(192, [1.0, 1.0, 1.0]) == [192, 192]
    assert slice_window(192, [2.0, 2.0, 2.0]) == [96, 96]
    assert slice_window(192, [1.25, 0.8, 3.0]) == [160, 240]


@pytest.fixture(scope="module")
def unet2d_fold(synthetic_dataset, synthetic_datalist, tmp_path_factory):
    """One epoch of the 2D U-Net on fold 0, then the evaluation config on it: (training workflow, output folder)."""
    output_dir = tmp_path_factory.mktemp("unet2d_fold0")
    settings = TINY_2D | {
        "dataset_dir": str(synthetic_dataset),
        "datalist": str(synthetic_datalist),
        "output_dir": str(output_dir),
    }
    training = ConfigWorkflow(config_file=[TRAIN_CONFIG, UNET2D_CONFIG], workflow_type="train", **settings)
    training.initialize()
    assert training.check_properties() == []
    training.run()
    evaluation = ConfigWorkflow(
        config_file=[TRAIN_CONFIG, EVALUATE_CONFIG, UNET2D_CONFIG], workflow_type="infer", **settings
    )
    evaluation.initialize()
    evaluation.run()
    return training, output_dir


def test_one_epoch_trains_a_2d_unet_on_tumour_aware_slices(unet2d_fold):
    training, output_dir = unet2d_fold
    parser = training.parser
    assert parser.get_parsed_content("roi_size") == [48, 48, 1]  # 192 mm at the tiny 4 mm spacing
    network = parser.get_parsed_content("network")
    assert isinstance(network, SliceWise) and isinstance(network.network, BasicUNet)
    assert network.network.conv_0.conv_0.conv.in_channels == 4
    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    assert batch["image"].shape == (3, 4, 48, 48, 1)  # crops_per_case slices of one case
    assert batch["label"].shape == (3, 3, 48, 48, 1)  # TC, WT, ET
    weights = torch.load(output_dir / "model.pt", weights_only=True)
    assert weights.keys() == network.state_dict().keys()
    assert weights["network.final_conv.weight"].ndim == 4  # a 2D convolution
    assert training.evaluator.state.epoch == 1 and "val_mean_dice" in training.evaluator.state.metrics


def test_2_5d_input_is_an_override(synthetic_dataset, synthetic_datalist, tmp_path):
    workflow = ConfigWorkflow(
        config_file=[TRAIN_CONFIG, UNET2D_CONFIG],
        workflow_type="train",
        **TINY_2D,
        slice_context=1,
        dataset_dir=str(synthetic_dataset),
        datalist=str(synthetic_datalist),
        output_dir=str(tmp_path),
    )
    workflow.initialize()
    network = workflow.parser.get_parsed_content("network")
    assert network.context == 1 and network.network.conv_0.conv_0.conv.in_channels == 12
    assert workflow.parser.get_parsed_content("roi_size") == [48, 48, 3]
    batch = next(iter(workflow.parser.get_parsed_content("train#dataloader")))
    prediction = network(batch["image"])
    assert prediction.shape == (3, 3, 48, 48, 3)
    loss = workflow.parser.get_parsed_content("loss")
    assert isinstance(loss, CentreSlicesLoss) and loss.context == 1
    assert torch.isfinite(loss(prediction, batch["label"]))


def test_evaluation_runs_the_2d_unet_slice_by_slice_back_on_the_input_grid(unet2d_fold):
    training, output_dir = unet2d_fold
    validation = training.parser.get_parsed_content("fold_split")[1]
    for case in validation:
        prediction = nib.load(output_dir / "evaluation" / "predictions" / f"{case['case']}.nii.gz")
        reference = nib.load(case["image"][0])
        assert prediction.shape == reference.shape
        np.testing.assert_allclose(prediction.affine, reference.affine)
    summary = json.loads((output_dir / "evaluation" / "summary.json").read_text())
    assert summary["num_cases"] == len(validation)
    inference = json.loads((output_dir / "evaluation" / "inference.json").read_text())
    assert inference["written"] == len(validation) and inference["seconds_per_case"] > 0


def test_the_inference_config_loads_the_2d_unet_and_writes_the_input_grid(unet2d_fold, synthetic_dataset, tmp_path):
    _, output_dir = unet2d_fold
    workflow = ConfigWorkflow(
        config_file=[INFERENCE_CONFIG, UNET2D_CONFIG],
        workflow_type="infer",
        unet_features=TINY_FEATURES,
        spacing=TINY_TRAINING["spacing"],
        checkpoints=[str(output_dir / "model.pt")],
        dataset_dir=str(synthetic_dataset / "ASNR-MICCAI-BraTS2023-PED-Challenge-ValidationData"),
        output_dir=str(tmp_path),
    )
    workflow.initialize()
    network = workflow.parser.get_parsed_content("network")
    saved = torch.load(output_dir / "model.pt", weights_only=True)
    assert isinstance(network, SliceWise)
    for name, tensor in network.state_dict().items():
        torch.testing.assert_close(tensor, saved[name])
    assert workflow.parser.get_parsed_content("val_roi_size") == [48, 48, -1]
    workflow.run()
    cases = workflow.parser.get_parsed_content("cases")
    assert len(cases) == 2
    for case in cases:
        prediction = nib.load(tmp_path / f"{case['case']}.nii.gz")
        reference = nib.load(case["image"][0])
        assert prediction.shape == reference.shape
        np.testing.assert_allclose(prediction.affine, reference.affine)
        assert set(np.unique(np.asanyarray(prediction.dataobj))) <= {0, 1, 2, 3}


def test_compare_models_tables_each_runs_scores_time_size_and_memory(unet2d_fold, tmp_path):
    _, output_dir = unet2d_fold
    table = compare_models([output_dir], names=["2D U-Net"], output=tmp_path / "comparison.md")
    assert (tmp_path / "comparison.md").read_text() == table
    header, rule, row = table.splitlines()
    assert header.split(" | ")[1:4] == [f"{region} legacy / lesion-wise Dice" for region in ("ET", "TC", "WT")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[0] == "2D U-Net"
    summary = json.loads((output_dir / "evaluation" / "summary.json").read_text())
    et = summary["regions"]["ET"]
    assert cells[1] == f"{et['legacy_dice']['mean']:.3f} / {et['lesionwise_dice']['mean']:.3f}"
    assert cells[4] == "1"  # epochs
    parameters = sum(tensor.numel() for tensor in tiny_unet().parameters())
    assert cells[7] == f"{parameters / 1e6:.2f}"
    assert float(cells[6]) > 0  # seconds per case

    with pytest.raises(InputError) as error:
        compare_models([output_dir, tmp_path / "no_run"])
    assert f"{tmp_path / 'no_run'}: model.pt is missing" in "\n".join(error.value.problems)
    with pytest.raises(InputError, match="2 names for 1 runs"):
        compare_models([output_dir], names=["a", "b"])
    other_cases = tmp_path / "other" / "fold0"
    shutil.copytree(output_dir, other_cases)
    (other_cases / "evaluation" / "summary.json").write_text(json.dumps(summary | {"num_cases": 7}))
    with pytest.raises(InputError, match="unlike the first run"):
        compare_models([output_dir, other_cases])
    (other_cases / "evaluation" / "summary.json").write_text(json.dumps(summary))
    per_case = other_cases / "evaluation" / "metrics_per_case.csv"
    first_case = per_case.read_text().splitlines()[1].split(",")[0]
    per_case.write_text(per_case.read_text().replace(first_case, "BraTS-PED-09999-000"))
    with pytest.raises(
        InputError, match=f"scored other cases than the first run \\(BraTS-PED-09999-000 for {first_case}\\)"
    ):
        compare_models([output_dir, other_cases])
    # Scores of another evaluation of the same run (e.g. with post-processing): --evaluation names its folder.
    shutil.copytree(output_dir / "evaluation", other_cases / "evaluation_postprocessed")
    rescored = json.loads(json.dumps(summary))
    rescored["regions"]["ET"]["legacy_dice"]["mean"] = 0.125
    (other_cases / "evaluation_postprocessed" / "summary.json").write_text(json.dumps(rescored))
    row = compare_models([other_cases], evaluation="evaluation_postprocessed").splitlines()[2]
    assert row.split("|")[2].strip() == f"0.125 / {et['lesionwise_dice']['mean']:.3f}"


def test_make_demo_model_unet2d_layers_the_unet2d_config():
    commands = subprocess.run(
        ["make", "-n", "demo", "MODEL=unet2d"], cwd=REPOSITORY, capture_output=True, text=True, check=True
    ).stdout
    bundle_runs = [line for line in commands.splitlines() if "monai.bundle run" in line]
    assert len(bundle_runs) == 2 and all("'configs/demo.yaml', 'configs/unet2d.yaml'" in line for line in bundle_runs)
    wrong = subprocess.run(["make", "-n", "demo", "MODEL=unet3d"], cwd=REPOSITORY, capture_output=True, text=True)
    assert wrong.returncode != 0 and "MODEL must be swin_unetr or unet2d" in wrong.stderr
