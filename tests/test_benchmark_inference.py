"""scripts/benchmark_inference.py on tiny synthetic cases with a tiny untrained Swin UNETR: a row per case with both
pipelines' seconds, peak RAM and per-region Dice, and a last line with both times and their ratio."""

from __future__ import annotations

import re

import numpy as np
import pytest

from scripts.benchmark_inference import REFERENCE, main, region_dice
from tests.conftest import SMALL_SHAPE, TINY_FEATURE_SIZE

TINY_NETWORK = {
    "feature_size": TINY_FEATURE_SIZE,
    "spacing": [4.0, 4.0, 4.0],
    "roi_size": [64, 64, 64],
    "val_roi_size": [64, 64, 64],
}
NUMBER = r"(\d+\.\d+)"


def test_region_dice_per_region_and_one_where_both_lack_it():
    first = np.zeros((4, 4, 4), dtype=np.uint8)
    second = first.copy()
    first[0, :2] = 2  # edema: WT only
    second[0, :1] = 2
    dice = region_dice(first, second, "brats2023_ped")
    assert dice == {"TC": 1.0, "WT": 2 * 4 / (8 + 4), "ET": 1.0}


def test_pipelines_that_are_the_same_agree_exactly_and_rows_are_printed(tiny_swin_checkpoint, capsys):
    main(
        checkpoint=str(tiny_swin_checkpoint),
        num_cases=1,
        levers=REFERENCE,
        overrides=TINY_NETWORK,
        shape=SMALL_SHAPE,
        variants={"fp32 cube": REFERENCE, "no tumour": {"min_component_voxels": 10**9}},
    )
    *rows, same_variant, other_variant, same_mean, other_mean, last = capsys.readouterr().out.strip().splitlines()
    (row,) = rows
    # Each variant against the same reference: the same settings agree exactly, a post-processing that removes
    # every tumour does not (the tiny network marks some).
    variant = rf"  {{}}  {NUMBER} s {NUMBER} GB  Dice TC {NUMBER} WT {NUMBER} ET {NUMBER}"
    assert re.fullmatch(variant.format("fp32 cube"), same_variant).groups()[2:] == ("1.0000",) * 3
    assert re.fullmatch(variant.format("no tumour"), other_variant).groups()[3] == "0.0000"
    assert re.fullmatch(rf"fp32 cube {NUMBER} s per case", same_mean)
    assert re.fullmatch(rf"no tumour {NUMBER} s per case", other_mean)
    pattern = (
        rf"BraTS-PED-\d{{5}}-000  bundle {NUMBER} s {NUMBER} GB  reference {NUMBER} s {NUMBER} GB  "
        rf"Dice TC {NUMBER} WT {NUMBER} ET {NUMBER}"
    )
    bundle_seconds, bundle_gb, reference_seconds, reference_gb, *dice = re.fullmatch(pattern, row).groups()
    assert dice == ["1.0000"] * 3
    assert float(bundle_gb) > 0.1 and float(reference_gb) > 0.1  # a whole process's peak RSS, in GB
    times = re.fullmatch(rf"bundle {NUMBER} s per case, reference {NUMBER} s per case: {NUMBER}x faster", last)
    bundle_mean, reference_mean, ratio = map(float, times.groups())
    assert (bundle_mean, reference_mean) == (round(float(bundle_seconds), 1), round(float(reference_seconds), 1))
    # The ratio is of the unrounded times: it lies where the printed means, each within 0.05 s, allow (and 0.005 of
    # its own rounding).
    half = 0.05
    assert (reference_mean - half) / (bundle_mean + half) - 0.005 <= ratio
    assert ratio <= (reference_mean + half) / max(bundle_mean - half, 1e-9) + 0.005


def test_missing_checkpoint_is_reported(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(checkpoint=str(tmp_path / "absent.pt"))
    assert exit.value.code == 1
    assert "absent.pt: no such checkpoint" in capsys.readouterr().err
