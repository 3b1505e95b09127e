"""2023 labels <-> nested regions [TC, WT, ET], their transforms, and the output-prior initialisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.networks.nets import SwinUNETR

from scripts.labels import (
    LabelsToRegionsd,
    RegionsToLabelsd,
    labels_to_regions,
    region_output_transform,
    regions_to_labels,
)
from scripts.network_init import set_output_prior


def test_labels_to_regions_uses_the_2023_scheme():
    label = np.array([0, 1, 2, 3])
    tc, wt, et = labels_to_regions(label)
    np.testing.assert_array_equal(tc, [False, True, False, True])
    np.testing.assert_array_equal(wt, [False, True, True, True])
    np.testing.assert_array_equal(et, [False, False, False, True])


@pytest.mark.parametrize("as_tensor", [False, True])
def test_labels_round_trip_through_regions(as_tensor):
    label = np.random.default_rng(0).integers(0, 4, size=(1, 7, 6, 5)).astype(np.uint8)
    data = torch.as_tensor(label) if as_tensor else label
    back = regions_to_labels(labels_to_regions(data))
    np.testing.assert_array_equal(np.asarray(back), label)


def test_regions_to_labels_gives_priority_et_then_tc_then_wt():
    # voxels: none, WT only, TC only (outside WT), ET only, all three
    regions = np.array([[0, 0, 1, 0, 1], [0, 1, 0, 0, 1], [0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(regions_to_labels(regions)[0], [0, 2, 1, 3, 3])


def test_dictionary_transforms_keep_metadata_and_types():
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))
    label = MetaTensor(torch.tensor([[[[0, 1, 2, 3]]]]), affine=affine)
    regions = LabelsToRegionsd(keys="label")({"label": label})["label"]
    assert regions.shape == (3, 1, 1, 4) and regions.dtype == torch.float32
    assert torch.equal(regions.affine, affine)
    back = RegionsToLabelsd(keys="label")({"label": regions})["label"]
    assert back.dtype == torch.uint8 and torch.equal(back.affine, affine)
    assert back.flatten().tolist() == [0, 1, 2, 3]


def test_shape_errors_are_explicit():
    with pytest.raises(ValueError, match="single-channel"):
        labels_to_regions(np.zeros((2, 3, 3, 3)))
    with pytest.raises(ValueError, match="3 region channels"):
        regions_to_labels(np.zeros((2, 3, 3, 3)))


def test_region_output_transform_selects_one_channel():
    pred, label = torch.rand(3, 4, 4, 4), torch.rand(3, 4, 4, 4)
    preds, labels = region_output_transform("ET")([{"pred": pred, "label": label}])
    assert torch.equal(preds[0], pred[2:3]) and torch.equal(labels[0], label[2:3])


def test_output_prior_sets_initial_probability():
    network = set_output_prior(SwinUNETR(4, 3, feature_size=12), prior=0.05)
    bias = network.out.conv.conv.bias
    assert torch.allclose(torch.sigmoid(bias), torch.full_like(bias, 0.05))
    assert math.isclose(float(bias[0].detach()), math.log(0.05 / 0.95), rel_tol=1e-6)
    with pytest.raises(ValueError, match="prior"):
        set_output_prior(network, prior=1.0)
