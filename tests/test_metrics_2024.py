"""Official BraTS-PEDs 2024 metrics (rules PED2024, labels brats2024_ped): the official scorer's numbers on the golden
cases, each rule on hand-built volumes, and a brute-force restatement of the rules."""

from __future__ import annotations

import sys

import cc3d
import numpy as np
import pytest
from scipy import ndimage

from scripts.metrics import MAX_HD95, compute_case_metrics
from tests.test_metrics import (
    GOLDEN_DIR,
    ISO,
    assert_official_numbers,
    golden_cases,
    label_map,
    reference_hd95,
)

SHAPE = (40, 24, 24)
TOTAL = int(np.prod(SHAPE))
REGIONS = ("ET", "TC", "WT", "NETC", "CC", "ED")
NOTHING_TO_SCORE = {
    "legacy_dice": 1.0,
    "legacy_hd95": 0.0,
    "lesionwise_dice": 1.0,
    "lesionwise_hd95": 0.0,
    "num_tp": 0,
    "num_fp": 0,
    "num_fn": 0,
    "sensitivity": 1.0,
    "specificity": 1.0,
    "gt_volume": 0.0,
}

# 2024 labels: 1 ET, 2 NET, 3 CC, 4 ED. The boxes below are enhancing tumour (1) unless another label is given.
CUBE_A = (1, (2, 8, 8), (4, 4, 4))  # 64 voxels at x 2..5


def cube_at(x: int, label: int = 1) -> tuple[int, tuple[int, int, int], tuple[int, int, int]]:
    """A 4x4x4 cube like A starting at ``x``: x = 6 + gap leaves ``gap`` empty voxels after A."""
    return (label, (x, 8, 8), (4, 4, 4))


def volume(*boxes) -> np.ndarray:
    return label_map(*boxes, shape=SHAPE)


def rows_2024(pred: np.ndarray, gt: np.ndarray, spacing=ISO, **rules) -> dict[str, dict]:
    return {row["region"]: row for row in compute_case_metrics(pred, gt, spacing, scheme="brats2024_ped", **rules)}


def et(pred: np.ndarray, gt: np.ndarray, spacing=ISO, **rules) -> dict:
    return rows_2024(pred, gt, spacing, **rules)["ET"]


def lesion_counts(row: dict) -> tuple[int, int, int]:
    return row["num_tp"], row["num_fp"], row["num_fn"]


def scores(row: dict) -> tuple[float, float, float, float]:
    """Legacy Dice and HD95, lesion-wise Dice and HD95."""
    return row["legacy_dice"], row["legacy_hd95"], row["lesionwise_dice"], row["lesionwise_hd95"]


@pytest.mark.skipif(not GOLDEN_DIR.is_dir(), reason=f"no golden cases in {GOLDEN_DIR}")
def test_2024_pediatric_metrics_are_the_official_scorers_numbers():
    cases = list(golden_cases("brats2024_ped"))
    assert len(cases) == 8
    for name, pred, gt, spacing, expected in cases:
        rows = compute_case_metrics(pred, gt, spacing, challenge="PED2024")
        assert [row["region"] for row in rows] == list(REGIONS)
        assert_official_numbers(name, rows, expected)


def test_predicted_components_within_reach_of_each_others_dilation_are_one_predicted_lesion():
    # A GT cube A and its exact prediction, plus a predicted cube 10 voxels further on (x 16..19): 5 dilations of
    # each reach x 10 and x 11, so the two predicted cubes are one lesion, which matches A:
    # Dice 2*64 / (64 + 128) = 2/3, one TP, no FP.
    merged = et(volume(CUBE_A, cube_at(16)), volume(CUBE_A))
    assert merged["lesionwise_dice"] == pytest.approx(2 / 3)
    assert lesion_counts(merged) == (1, 0, 0)
    # Both maps hold lesion 1 only, so the lesion's HD95 is the legacy one: the far face of the extra cube (corners at
    # x 20) is 14 mm from A's nearest face (x 6), and it holds more than 5% of the predicted surface.
    assert merged["lesionwise_hd95"] == merged["legacy_hd95"] == 14.0
    # 11 voxels apart (x 17..20) the dilations leave x 11 empty: a predicted lesion of its own that reaches no GT
    # lesion (A's 5 dilations stop at x 10): A scores (1, 0 mm), the false positive (0, 374 mm).
    apart = et(volume(CUBE_A, cube_at(17)), volume(CUBE_A))
    assert (apart["lesionwise_dice"], apart["lesionwise_hd95"]) == (0.5, 187.0)
    assert lesion_counts(apart) == (1, 1, 0)
    # The 2023 rules never merge predicted components: the cube 10 voxels away is a false positive there.
    assert lesion_counts(et(volume(CUBE_A, cube_at(16)), volume(CUBE_A), challenge="PED")) == (1, 1, 0)


def test_predicted_lesions_of_at_most_10_voxels_are_erased_before_anything_is_scored():
    gt = volume(CUBE_A)
    ten, eleven = (1, (30, 16, 16), (2, 5, 1)), (1, (30, 4, 16), (1, 11, 1))
    erased = et(volume(CUBE_A, ten), gt)
    # Legacy metrics, sensitivity and specificity included, see the prediction without it.
    assert erased == et(gt, gt)
    assert (erased["legacy_dice"], erased["legacy_hd95"], erased["lesionwise_dice"]) == (1.0, 0.0, 1.0)
    assert lesion_counts(erased) == (1, 0, 0)
    kept = et(volume(CUBE_A, eleven), gt)
    assert (kept["lesionwise_dice"], kept["lesionwise_hd95"]) == (0.5, 187.0)
    assert lesion_counts(kept) == (1, 1, 0)
    assert kept["legacy_dice"] == pytest.approx(2 * 64 / (64 + 75))
    # The size is counted in voxels, not mm^3: 10 voxels of 2 mm^3 are still erased.
    assert lesion_counts(et(volume(CUBE_A, ten), gt, spacing=(1.0, 1.0, 2.0))) == (1, 0, 0)


def test_the_size_that_decides_erasure_is_the_merged_predicted_lesions():
    gt = volume(CUBE_A)
    six_voxels = [(1, (30, 4, z), (1, 2, 3)) for z in (4, 10, 19)]  # z 4..6, 10..12 (3 apart), 19..21 (12 apart)
    # Two 6-voxel blobs 3 voxels apart merge into one 12-voxel lesion: kept, one false positive.
    together = et(volume(CUBE_A, *six_voxels[:2]), gt)
    assert lesion_counts(together) == (1, 1, 0)
    assert together["lesionwise_dice"] == 0.5
    # 12 voxels apart they stay two lesions of 6 voxels: both erased.
    apart = et(volume(CUBE_A, six_voxels[0], six_voxels[2]), gt)
    assert lesion_counts(apart) == (1, 0, 0)
    assert (apart["legacy_dice"], apart["lesionwise_dice"]) == (1.0, 1.0)


def test_gt_lesions_of_at_most_10_cubic_millimetres_are_left_out():
    prediction = volume(CUBE_A)
    ten, eleven = (1, (30, 16, 16), (2, 5, 1)), (1, (30, 4, 16), (1, 11, 1))
    dropped = et(prediction, volume(CUBE_A, ten))
    assert (dropped["lesionwise_dice"], dropped["lesionwise_hd95"]) == (1.0, 0.0)
    assert lesion_counts(dropped) == (1, 0, 0)
    assert dropped["legacy_dice"] == pytest.approx(2 * 64 / (64 + 74))
    missed = et(prediction, volume(CUBE_A, eleven))
    assert (missed["lesionwise_dice"], missed["lesionwise_hd95"]) == (0.5, 187.0)
    assert lesion_counts(missed) == (1, 0, 1)
    # The threshold is a volume: with 2 mm slices 6 voxels are 12 mm^3 (kept, missed), 5 voxels 10 mm^3 (dropped).
    anisotropic = (1.0, 1.0, 2.0)
    six, five = (1, (30, 16, 16), (1, 6, 1)), (1, (30, 16, 16), (1, 5, 1))
    assert lesion_counts(et(prediction, volume(CUBE_A, six), spacing=anisotropic)) == (1, 0, 1)
    assert lesion_counts(et(prediction, volume(CUBE_A, five), spacing=anisotropic)) == (1, 0, 0)
    # A predicted lesion (12 voxels, kept) matching a dropped GT lesion is no false positive.
    matched = et(volume(CUBE_A, (1, (30, 16, 16), (2, 6, 1))), volume(CUBE_A, ten))
    assert lesion_counts(matched) == (1, 0, 0)
    assert matched["lesionwise_dice"] == 1.0


def test_five_dilations_merge_gt_components_and_reach_predictions():
    # A and a GT cube 10 voxels further are one lesion of 128 voxels; the prediction A matches it: Dice 2/3.
    one_lesion = et(volume(CUBE_A), volume(CUBE_A, cube_at(16)))
    assert one_lesion["lesionwise_dice"] == pytest.approx(2 / 3)
    assert lesion_counts(one_lesion) == (1, 0, 0)
    # 11 voxels apart: two lesions, A perfect (1, 0 mm) and the other missed (0, 374 mm).
    two_lesions = et(volume(CUBE_A), volume(CUBE_A, cube_at(17)))
    assert (two_lesions["lesionwise_dice"], two_lesions["lesionwise_hd95"]) == (0.5, 187.0)
    assert lesion_counts(two_lesions) == (1, 0, 1)
    # A prediction 4 voxels beyond A (x 10..13) lies in A's fifth dilation: matched, with Dice 0 and HD95 8 mm (A's
    # near and far faces are 4 and 8 mm from the prediction's near face, and the far faces are 8 mm apart)...
    reached = et(volume(cube_at(10)), volume(CUBE_A))
    assert (reached["lesionwise_dice"], reached["lesionwise_hd95"]) == (0.0, 8.0)
    assert lesion_counts(reached) == (1, 0, 0)
    # ... 5 voxels beyond (x 11..14) it does not: a missed lesion and a false positive.
    beyond = et(volume(cube_at(11)), volume(CUBE_A))
    assert (beyond["lesionwise_dice"], beyond["lesionwise_hd95"]) == (0.0, MAX_HD95)
    assert lesion_counts(beyond) == (0, 1, 1)


def test_regions_empty_in_both_score_perfectly_even_after_erasure():
    gt = volume(CUBE_A)
    rows = rows_2024(volume(CUBE_A, (3, (30, 16, 16), (2, 5, 1))), gt)  # plus a 10-voxel cyst: erased
    for region in ("NETC", "CC", "ED"):
        assert rows[region] == {"region": region, **NOTHING_TO_SCORE}
    for region in ("ET", "TC", "WT"):
        assert (rows[region]["legacy_dice"], rows[region]["legacy_hd95"], rows[region]["num_tp"]) == (1.0, 0.0, 1)
    empty = np.zeros(SHAPE, np.uint8)
    assert list(rows_2024(empty, empty).values()) == [{"region": region, **NOTHING_TO_SCORE} for region in REGIONS]


def test_region_empty_on_one_side():
    # GT cyst where the prediction says non-enhancing tumour: CC missed, NETC all false positive, TC and WT perfect.
    rows = rows_2024(volume(cube_at(2, label=2)), volume(cube_at(2, label=3)))
    missed, false_positive = rows["CC"], rows["NETC"]
    assert scores(missed) == (0.0, MAX_HD95, 0.0, MAX_HD95)
    assert lesion_counts(missed) == (0, 0, 1)
    assert (missed["sensitivity"], missed["specificity"], missed["gt_volume"]) == (0.0, 1.0, 64.0)
    assert scores(false_positive) == (0.0, MAX_HD95, 0.0, MAX_HD95)
    assert lesion_counts(false_positive) == (0, 1, 0)
    assert (false_positive["sensitivity"], false_positive["gt_volume"]) == (0.0, 0.0)
    assert false_positive["specificity"] == (TOTAL - 64) / TOTAL
    for region in ("TC", "WT"):
        assert (rows[region]["legacy_dice"], rows[region]["lesionwise_dice"], rows[region]["num_tp"]) == (1.0, 1.0, 1)


def test_sensitivity_and_specificity_are_computed_on_lesion_ids_as_the_official_scorer_does():
    # A perfect prediction of two GT lesions, A (64 voxels, id 1: first in C order) and a 27-voxel cube (id 2). The
    # official formula counts agreement on id 1 only and sums ids: TP = 64, FN = 64 + 2 * 27 - 64 = 54, FP = 54.
    label = volume(CUBE_A, (1, (30, 16, 16), (3, 3, 3)))
    row = et(label, label)
    assert row["sensitivity"] == 64 / 118
    assert row["specificity"] == (TOTAL - 64) / (TOTAL - 64 + 54)
    assert (row["legacy_dice"], row["legacy_hd95"], row["lesionwise_dice"], lesion_counts(row)) == (1, 0, 1, (2, 0, 0))
    # The 2023 rules count voxels.
    voxel_wise = et(label, label, challenge="PED")
    assert (voxel_wise["sensitivity"], voxel_wise["specificity"]) == (1.0, 1.0)


# ---- brute force: the official 2024 rules restated as directly as possible, on whole volumes ----


def reference_region_2024(pred: np.ndarray, gt: np.ndarray, spacing) -> dict:
    structure = ndimage.generate_binary_structure(3, 2)
    voxel_mm3 = spacing[0] * spacing[1] * spacing[2]

    def merged_lesions(mask):
        """Each voxel of the mask labelled with its component of the 5 times dilated mask."""
        return np.where(mask, cc3d.connected_components(ndimage.binary_dilation(mask, structure, 5)), 0)

    gt_ids, pred_ids = merged_lesions(gt), merged_lesions(pred)
    ids, counts = np.unique(pred_ids, return_counts=True)
    pred_ids[np.isin(pred_ids, ids[counts <= 10])] = 0
    lesions, matched_anywhere = [], set()
    for lesion_id in range(1, gt_ids.max() + 1):
        lesion = gt_ids == lesion_id
        matched = set(np.unique(pred_ids[ndimage.binary_dilation(lesion, structure, 5)])) - {0}
        matched_anywhere |= matched
        matched_mask = np.isin(pred_ids, list(matched))
        dice = 2 * (lesion & matched_mask).sum() / (lesion.sum() + matched_mask.sum())
        if lesion.sum() * voxel_mm3 > 10:
            lesions.append((bool(matched), dice, reference_hd95(lesion, matched_mask, spacing)))
    num_fp = len(set(np.unique(pred_ids)) - {0} - matched_anywhere)
    count = len(lesions) + num_fp
    empty = not (gt_ids.any() or pred_ids.any())
    # The official sensitivity and specificity, of the id maps: agreement on id 1 only, ids summed.
    both_one, neither_one = np.sum((pred_ids == 1) & (gt_ids == 1)), np.sum((pred_ids != 1) & (gt_ids != 1))
    return {
        "legacy_dice": 1.0 if empty else 2 * np.sum(gt & (pred_ids > 0)) / (gt.sum() + np.sum(pred_ids > 0)),
        "legacy_hd95": 0.0 if empty else reference_hd95(gt_ids, pred_ids, spacing),
        "lesionwise_dice": sum(d for _, d, _ in lesions) / count if count else 1.0,
        "lesionwise_hd95": (sum(h for _, _, h in lesions) + 374 * num_fp) / count if count else 0.0,
        "num_tp": sum(m for m, _, _ in lesions),
        "num_fp": num_fp,
        "num_fn": sum(not m for m, _, _ in lesions),
        "sensitivity": 1.0 if empty else both_one / (gt_ids.sum() + sys.float_info.min),
        "specificity": neither_one / (neither_one + pred_ids.sum() - both_one + sys.float_info.min),
        "gt_volume": gt.sum() * voxel_mm3,
    }


def random_boxes_2024(rng: np.random.Generator, shape: tuple[int, ...], count: int) -> np.ndarray:
    """2024 labels painted as ``count`` boxes of 1 to 216 voxels at random: lesions near and far from each other,
    large and small, some touching the border, regions inside and outside each other."""
    label = np.zeros(shape, np.uint8)
    for _ in range(count):
        size = rng.integers(1, 7, 3)
        start = rng.integers(0, np.array(shape) - size + 1)
        label[tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))] = rng.integers(1, 5)
    return label


@pytest.mark.parametrize("seed", range(8))
def test_matches_brute_force_restatement_of_the_2024_rules(seed):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(36, 56)), int(rng.integers(20, 32)), int(rng.integers(20, 32)))
    gt = random_boxes_2024(rng, shape, 12)
    if seed % 2:
        pred = random_boxes_2024(rng, shape, 12)
    else:
        extra = random_boxes_2024(rng, shape, 4)
        pred = np.where(extra > 0, extra, np.where(rng.random(shape) < 0.1, 0, np.roll(gt, 1, 0)))
    spacing = [(1.0, 1.0, 1.0), (0.9, 1.1, 2.5), (0.5, 0.5, 3.0)][seed % 3]
    rows = compute_case_metrics(pred, gt, spacing, challenge="PED2024")
    regions = {"ET": (1,), "TC": (1, 2, 3), "WT": (1, 2, 3, 4), "NETC": (2,), "CC": (3,), "ED": (4,)}
    assert [row["region"] for row in rows] == list(regions)
    for row in rows:
        labels = regions[row["region"]]
        expected = reference_region_2024(np.isin(pred, labels), np.isin(gt, labels), spacing)
        for name, value in expected.items():
            assert row[name] == pytest.approx(value, rel=1e-9, abs=1e-9), (row["region"], name)


def test_a_subset_of_regions_scores_as_in_the_full_call():
    pred = volume(CUBE_A, cube_at(16, label=2), cube_at(26, label=4))
    gt = volume(CUBE_A, cube_at(17, label=2))
    full = rows_2024(pred, gt, hd95=False)
    rows = compute_case_metrics(pred, gt, ISO, scheme="brats2024_ped", hd95=False, regions=["ED", "TC"])
    assert [row["region"] for row in rows] == ["TC", "ED"]  # the scheme's order
    for row in rows:
        assert row == pytest.approx(full[row["region"]], nan_ok=True)
    assert rows[1]["num_fp"] == 1
    with pytest.raises(ValueError, match="not all among brats2024_ped's"):
        compute_case_metrics(pred, gt, ISO, scheme="brats2024_ped", regions=["ET", "XX"])
