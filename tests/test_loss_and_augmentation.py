"""The training config's loss and augmentation: every region keeps a gradient, and the augmentation chain runs."""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose
from monai.utils import set_determinism

from tests.conftest import TRAIN_CONFIG

ROI = [32, 32, 32]


def parsed_config(**overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(TRAIN_CONFIG)
    for key, value in overrides.items():
        parser[key] = value
    return parser


def region_logits_and_target() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the three regions (TC, WT, ET) on a small crop whose ground truth has TC and WT but no ET."""
    logits = torch.zeros(1, 3, 8, 8, 8)
    logits[:, 2] = 0.5  # some enhancing tumour predicted where there is none
    target = torch.zeros(1, 3, 8, 8, 8)
    target[:, 0, 2:5, 2:5, 2:5] = 1
    target[:, 1, 1:6, 1:6, 1:6] = 1
    return logits.requires_grad_(), target


def test_a_region_absent_from_the_crop_still_gets_a_gradient():
    loss = parsed_config().get_parsed_content("loss")
    logits, target = region_logits_and_target()
    loss(logits, target).backward()
    et_gradient = logits.grad[:, 2]
    # Every voxel of the empty region is pushed towards "no ET" (a positive gradient lowers its logit).
    assert torch.all(et_gradient > 0)
    assert torch.all(logits.grad[:, :2].abs().sum() > 0)


def test_dice_alone_would_leave_the_absent_region_without_a_gradient():
    """Why the default adds cross-entropy: the Dice term by itself is flat for a region absent from the crop."""
    dice = parsed_config().get_parsed_content("loss").dice
    logits, target = region_logits_and_target()
    dice(logits, target).backward()
    assert torch.count_nonzero(logits.grad[:, 2]) == 0


def crop_input() -> dict:
    """A preprocessed case as the training cache holds it: 4 channels and a 2023 label map with every label."""
    image = torch.rand(4, 48, 48, 48)
    label = torch.zeros(1, 48, 48, 48)
    label[:, 10:38, 10:38, 10:38] = 2
    label[:, 16:32, 16:32, 16:32] = 1
    label[:, 20:28, 20:28, 20:28] = 3
    return {"image": image, "label": label}


def augmented_crops(probability: float) -> list[dict]:
    overrides = {f"augment_prob#{name}": probability for name in parsed_config()["augment_prob"]}
    parser = parsed_config(roi_size=ROI, crops_per_case=2, **overrides)
    chain = Compose(parser.get_parsed_content("train#deterministic_transforms"))
    chain = Compose([*chain.transforms, *parser.get_parsed_content("train#random_transforms")])
    set_determinism(seed=0)
    return chain(crop_input())


@pytest.mark.parametrize("probability", [0.0, 1.0])
def test_augmented_crops_are_roi_sized_nested_regions(probability):
    for crop in augmented_crops(probability):
        assert crop["image"].shape == (4, *ROI) and torch.isfinite(crop["image"]).all()
        regions = crop["label"]
        assert regions.shape == (3, *ROI) and set(regions.unique().tolist()) <= {0.0, 1.0}
        tc, wt, et = regions
        # Labels are resampled nearest, so the regions stay binary and nested: ET within TC within WT.
        assert torch.all(et <= tc) and torch.all(tc <= wt)
        assert "label_cls_indices" not in crop


def test_every_augmentation_changes_the_crop_when_it_is_drawn():
    unchanged, augmented = augmented_crops(0.0), augmented_crops(1.0)
    for plain, changed in zip(unchanged, augmented, strict=True):
        assert not torch.allclose(plain["image"], changed["image"])
    set_determinism(seed=None)
