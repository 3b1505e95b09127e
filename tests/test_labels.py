"""Label schemes: labels <-> the network's regions for each scheme, their transforms, metadata, and the output prior."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.networks.nets import SwinUNETR

from scripts.labels import SCHEMES, LabelsToRegionsd, RegionsToLabelsd, get_scheme, region_output_transform
from scripts.network_init import set_output_prior
from tests.conftest import METADATA


def test_2023_regions_are_nested_tc_wt_et():
    tc, wt, et = get_scheme("brats2023_ped").labels_to_regions(np.array([0, 1, 2, 3]))
    np.testing.assert_array_equal(tc, [False, True, False, True])
    np.testing.assert_array_equal(wt, [False, True, True, True])
    np.testing.assert_array_equal(et, [False, False, False, True])


def test_2024_channels_recover_every_label_and_scored_region():
    scheme = get_scheme("brats2024_ped")
    label = np.array([0, 1, 2, 3, 4])  # background, ET, NET, CC, ED
    tc, wt, et, cc = scheme.labels_to_regions(label)
    np.testing.assert_array_equal(tc, [0, 1, 1, 1, 0])
    np.testing.assert_array_equal(wt, [0, 1, 1, 1, 1])
    np.testing.assert_array_equal(et, [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(cc, [0, 0, 0, 1, 0])
    scored = scheme.labels_to_regions(label, scheme.scored_regions)
    np.testing.assert_array_equal(scored, [[0, 1, 0, 0, 0], tc, wt, [0, 0, 1, 0, 0], cc, [0, 0, 0, 0, 1]])


def test_2021_enhancing_tumour_is_label_4():
    tc, wt, et = get_scheme("brats2021").labels_to_regions(np.array([0, 1, 2, 4]))
    np.testing.assert_array_equal(et, [False, False, False, True])
    np.testing.assert_array_equal(tc, [False, True, False, True])


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_labels_round_trip_through_regions(name, as_tensor):
    scheme = get_scheme(name)
    values = np.array(sorted(scheme.values), dtype=np.uint8)
    label = values[np.random.default_rng(0).integers(0, len(values), size=(1, 7, 6, 5))]
    data = torch.as_tensor(label) if as_tensor else label
    back = scheme.regions_to_labels(scheme.labels_to_regions(data))
    np.testing.assert_array_equal(np.asarray(back), label)


def test_regions_to_labels_paints_et_over_tc_over_wt():
    # voxels: none, WT only, TC only (outside WT), ET only, all three
    regions = np.array([[0, 0, 1, 0, 1], [0, 1, 0, 0, 1], [0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(get_scheme("brats2023_ped").regions_to_labels(regions)[0], [0, 2, 1, 3, 3])
    # 2024: voxels WT only, TC, TC + CC, TC + ET + CC (enhancing wins)
    regions = np.array([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(get_scheme("brats2024_ped").regions_to_labels(regions)[0], [4, 2, 3, 1])


def test_crop_ratios_follow_the_label_values():
    assert get_scheme("brats2023_ped").crop_ratios(2.0) == [1, 1, 1, 2]
    assert get_scheme("brats2024_ped").crop_ratios(2.0) == [1, 2, 1, 1, 1]
    assert get_scheme("brats2021").crop_ratios(2.0) == [1, 1, 1, 0, 2]
    assert get_scheme("brats2023_ped").crop_ratios(3.0, background_weight=2.5) == [2.5, 1, 1, 3]
    assert get_scheme("brats2024_ped").crop_ratios(1.0, background_weight=0.5) == [0.5, 1, 1, 1, 1]


def test_dictionary_transforms_keep_metadata_and_types():
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))
    label = MetaTensor(torch.tensor([[[[0, 1, 2, 3, 4]]]]), affine=affine)
    regions = LabelsToRegionsd(keys="label", label_scheme="brats2024_ped")({"label": label})["label"]
    assert regions.shape == (4, 1, 1, 5) and regions.dtype == torch.float32
    assert torch.equal(regions.affine, affine)
    back = RegionsToLabelsd(keys="label", label_scheme="brats2024_ped")({"label": regions})["label"]
    assert back.dtype == torch.uint8 and torch.equal(back.affine, affine)
    assert back.flatten().tolist() == [0, 1, 2, 3, 4]


def test_shape_and_name_errors_are_explicit():
    with pytest.raises(ValueError, match="single-channel"):
        get_scheme().labels_to_regions(np.zeros((2, 3, 3, 3)))
    with pytest.raises(ValueError, match="4 region channels"):
        get_scheme("brats2024_ped").regions_to_labels(np.zeros((3, 3, 3, 3)))
    with pytest.raises(ValueError, match="unknown label_scheme 'brats2025'; valid: brats2023_ped, brats2024_ped"):
        get_scheme("brats2025")


def test_region_output_transform_selects_one_channel():
    pred, label = torch.rand(4, 4, 4, 4), torch.rand(4, 4, 4, 4)
    preds, labels = region_output_transform("CC", "brats2024_ped")([{"pred": pred, "label": label}])
    assert torch.equal(preds[0], pred[3:4]) and torch.equal(labels[0], label[3:4])


@pytest.mark.parametrize("name", SCHEMES)
def test_metadata_describes_each_scheme_as_the_labels_module_defines_it(name):
    with open(METADATA) as file:
        described = json.load(file)["label_schemes"][name]
    scheme = get_scheme(name)
    assert described["labels"] == {str(value): text for value, text in scheme.label_names().items()}
    assert list(described["channel_def"]) == [str(index) for index in range(len(scheme.channels))]
    for index, region in enumerate(scheme.channels):
        values = ", ".join(map(str, sorted(scheme.regions[region])))
        assert described["channel_def"][str(index)].startswith(f"{region}: ")
        assert described["channel_def"][str(index)].endswith(f"(label{'s' if ',' in values else ''} {values})")


def test_output_prior_sets_initial_probability():
    network = set_output_prior(SwinUNETR(4, 3, feature_size=12), prior=0.05)
    bias = network.out.conv.conv.bias
    assert torch.allclose(torch.sigmoid(bias), torch.full_like(bias, 0.05))
    assert math.isclose(float(bias[0].detach()), math.log(0.05 / 0.95), rel_tol=1e-6)
    with pytest.raises(ValueError, match="prior"):
        set_output_prior(network, prior=1.0)
