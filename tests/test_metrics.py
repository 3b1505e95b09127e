"""Official BraTS 2023 metrics on hand-built volumes, against a brute-force restatement of the rules and against the
official scorer's numbers (golden cases); how the rules and the label scheme are chosen."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import cc3d
import nibabel as nib
import numpy as np
import pytest
from monai.metrics.utils import create_table_neighbour_code_to_surface_area
from scipy import ndimage
from scipy.spatial.distance import cdist

from scripts.errors import InputError
from scripts.labels import get_scheme
from scripts.metrics import (
    CHALLENGES,
    MAX_HD95,
    METRIC_NAMES,
    ChallengeParameters,
    compute_case_metrics,
    resolve_rules,
    surface_hd95,
)

SHAPE = (32, 24, 24)
ISO = (1.0, 1.0, 1.0)
# Prediction / GT pairs with the official scorers' numbers, beside the repository (see its README.md).
GOLDEN_DIR = Path(__file__).resolve().parents[2] / "shared" / "golden"
# The official scorers' column for each metric.
OFFICIAL_COLUMNS = {
    "legacy_dice": "Legacy_Dice",
    "legacy_hd95": "Legacy_HD95",
    "lesionwise_dice": "LesionWise_Score_Dice",
    "lesionwise_hd95": "LesionWise_Score_HD95",
    "num_tp": "Num_TP",
    "num_fp": "Num_FP",
    "num_fn": "Num_FN",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "gt_volume": "GT_Complete_Volume",
}


def label_map(*boxes: tuple[int, tuple[int, int, int], tuple[int, int, int]], shape=SHAPE) -> np.ndarray:
    """Label map of ``shape`` with each (label, start, size) box painted in order."""
    volume = np.zeros(shape, np.uint8)
    for value, start, size in boxes:
        volume[tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))] = value
    return volume


def et_region(pred: np.ndarray, gt: np.ndarray, spacing=ISO, challenge: str = "PED") -> dict:
    return compute_case_metrics(pred, gt, spacing, challenge)[0]


CUBE_A = (3, (2, 8, 8), (4, 4, 4))  # 64 voxels at x 2..5
CUBE_B_NEAR = (3, (10, 8, 8), (4, 4, 4))  # x 10..13: a 4-voxel gap to A
CUBE_B_FAR = (3, (14, 8, 8), (4, 4, 4))  # x 14..17: an 8-voxel gap to A
SMALL_CUBE = (3, (24, 16, 16), (3, 3, 3))  # 27 voxels, far from the others


def test_rows_are_et_tc_wt_with_exactly_the_documented_keys():
    rows = compute_case_metrics(label_map(CUBE_A), label_map(CUBE_A), ISO)
    assert [row["region"] for row in rows] == ["ET", "TC", "WT"]
    assert all(list(row) == ["region", *METRIC_NAMES] for row in rows)
    assert all(isinstance(row[key], int) for row in rows for key in ("num_tp", "num_fp", "num_fn"))


def test_gt_components_within_reach_of_the_dilation_form_one_lesion():
    # PED dilates 3 times: A reaches x=8 and B (x 10..13) reaches x=7, so A+B is one 128-voxel lesion, and the
    # prediction A matches it: Dice 2*64/(128+64) = 2/3, one TP, no FN.
    ped = et_region(label_map(CUBE_A), label_map(CUBE_A, CUBE_B_NEAR))
    assert ped["lesionwise_dice"] == pytest.approx(2 / 3)
    assert (ped["num_tp"], ped["num_fp"], ped["num_fn"]) == (1, 0, 0)
    # One lesion matched by the whole prediction is the legacy comparison.
    assert ped["lesionwise_hd95"] == ped["legacy_hd95"] > 0
    # MEN dilates once: A reaches x=6 and B x=9, so two lesions: A perfect (1, 0 mm), B missed (0, 374 mm).
    men = et_region(label_map(CUBE_A), label_map(CUBE_A, CUBE_B_NEAR), challenge="MEN")
    assert men["lesionwise_dice"] == pytest.approx(0.5)
    assert men["lesionwise_hd95"] == pytest.approx(374 / 2)
    assert (men["num_tp"], men["num_fp"], men["num_fn"]) == (1, 0, 1)


def test_one_predicted_component_touching_two_lesions_counts_for_both():
    # A (x 2..5) and B (x 14..17) stay apart after 3 dilations (x<=8 and x>=11). A 2x2 bar along x 3..16 (56 voxels)
    # joins them: it overlaps each cube on 3x2x2 = 12 voxels, so each lesion's Dice is 2*12/(64+56) = 0.2.
    bar = (3, (3, 9, 9), (14, 2, 2))
    et = et_region(label_map(bar), label_map(CUBE_A, CUBE_B_FAR))
    assert et["lesionwise_dice"] == pytest.approx(0.2)
    assert (et["num_tp"], et["num_fp"], et["num_fn"]) == (2, 0, 0)
    assert et["legacy_dice"] == pytest.approx(2 * 24 / (128 + 56))


def test_small_lesions_are_dropped_but_their_matches_are_not_false_positives():
    gt = label_map(CUBE_A, SMALL_CUBE)  # the 27 mm^3 cube is <= 50 mm^3
    matched = et_region(label_map(CUBE_A, SMALL_CUBE), gt)
    assert (matched["lesionwise_dice"], matched["lesionwise_hd95"]) == (1.0, 0.0)
    assert (matched["num_tp"], matched["num_fp"], matched["num_fn"]) == (1, 0, 0)
    # A prediction that only grazes the small lesion is still its match, not a false positive.
    grazing = et_region(label_map(CUBE_A, (3, (23, 15, 15), (1, 1, 1))), gt)
    assert (grazing["lesionwise_dice"], grazing["num_fp"]) == (1.0, 0)
    unmatched = et_region(label_map(CUBE_A), gt)
    assert (unmatched["lesionwise_dice"], unmatched["num_fn"]) == (1.0, 0)
    assert unmatched["legacy_dice"] == pytest.approx(2 * 64 / (91 + 64))


def test_the_volume_threshold_is_inclusive_and_in_cubic_millimetres():
    fifty_voxels = (3, (20, 10, 10), (5, 5, 2))
    dropped = et_region(label_map(CUBE_A), label_map(CUBE_A, fifty_voxels))
    assert (dropped["lesionwise_dice"], dropped["num_fn"]) == (1.0, 0)
    # The same 27 voxels are 54 mm^3 with 2 mm slices: kept, and missed -> Dice (1 + 0) / 2.
    kept = et_region(label_map(CUBE_A), label_map(CUBE_A, SMALL_CUBE), spacing=(1.0, 1.0, 2.0))
    assert (kept["lesionwise_dice"], kept["num_fn"]) == (0.5, 1)
    assert kept["gt_volume"] == pytest.approx((64 + 27) * 2.0)


def test_false_positives_count_in_both_lesion_wise_scores_whatever_their_size():
    # One perfect lesion (Dice 1, 0 mm) plus a 1-voxel false positive (Dice 0, 374 mm) -> 1/2 and 374/2.
    et = et_region(label_map(CUBE_A, (3, (28, 20, 20), (1, 1, 1))), label_map(CUBE_A))
    assert (et["lesionwise_dice"], et["lesionwise_hd95"]) == (0.5, 187.0)
    assert (et["num_tp"], et["num_fp"], et["num_fn"]) == (1, 1, 0)
    assert et["legacy_dice"] == pytest.approx(128 / 129)


def test_both_empty_scores_perfectly():
    empty = np.zeros(SHAPE, np.uint8)
    for row in compute_case_metrics(empty, empty, ISO):
        assert (row["legacy_dice"], row["legacy_hd95"], row["lesionwise_dice"], row["lesionwise_hd95"]) == (1, 0, 1, 0)
        assert (row["num_tp"], row["num_fp"], row["num_fn"]) == (0, 0, 0)
        assert (row["sensitivity"], row["specificity"], row["gt_volume"]) == (1.0, 1.0, 0.0)


def test_missed_region_scores_zero_dice_and_374_mm():
    # The GT cube is enhancing (3), the prediction calls it core (1): ET is missed, TC and WT are perfect.
    et, tc, wt = compute_case_metrics(label_map((1, (2, 8, 8), (4, 4, 4))), label_map(CUBE_A), ISO)
    assert (et["legacy_dice"], et["legacy_hd95"], et["lesionwise_dice"], et["lesionwise_hd95"]) == (0, MAX_HD95, 0, 374)
    assert (et["num_tp"], et["num_fp"], et["num_fn"], et["sensitivity"], et["gt_volume"]) == (0, 0, 1, 0.0, 64.0)
    assert et["specificity"] == 1.0
    for row in (tc, wt):
        assert (row["legacy_dice"], row["legacy_hd95"], row["lesionwise_dice"], row["num_tp"]) == (1, 0, 1, 1)


def test_region_predicted_where_gt_has_none_is_all_false_positive():
    et = et_region(label_map(CUBE_A), np.zeros(SHAPE, np.uint8))
    assert (et["legacy_dice"], et["legacy_hd95"], et["lesionwise_dice"], et["lesionwise_hd95"]) == (0, 374, 0, 374)
    assert (et["num_tp"], et["num_fp"], et["num_fn"], et["sensitivity"]) == (0, 1, 0, 0.0)
    total = np.prod(SHAPE)
    assert et["specificity"] == pytest.approx((total - 64) / total)


@pytest.mark.parametrize(("spacing", "expected_mm"), [(ISO, 2.0), ((1.0, 1.0, 2.5), 5.0), ((2.5, 1.0, 1.0), 2.0)])
def test_hd95_is_in_millimetres_along_each_axis(spacing, expected_mm):
    # Two lone voxels 2 apart along the last axis: 4 GT surface corners are 1 voxel from the prediction's, the other
    # 4 are 2 voxels away; all 8 have the same area, so the 95th percentile is the largest: 2 x that axis' spacing.
    gt, pred = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    gt[10, 10, 10], pred[10, 10, 12] = True, True
    assert surface_hd95(gt, pred, spacing) == pytest.approx(expected_mm)
    row = et_region(pred.astype(np.uint8) * 3, gt.astype(np.uint8) * 3, spacing=spacing)
    assert row["legacy_hd95"] == pytest.approx(expected_mm)


def test_met_keeps_lesions_above_2_mm3():
    # MET drops only lesions of at most 2 mm^3: the missed 27-voxel cube now counts -> Dice 1/2, HD95 374/2.
    gt = label_map(CUBE_A, SMALL_CUBE)
    ped, met = (et_region(label_map(CUBE_A), gt, challenge=name) for name in ("PED", "MET"))
    assert (ped["lesionwise_dice"], ped["num_fn"]) == (1.0, 0)
    assert (met["lesionwise_dice"], met["lesionwise_hd95"], met["num_fn"]) == (0.5, 187.0, 1)
    two_voxels = (3, (24, 16, 16), (2, 1, 1))
    assert et_region(label_map(CUBE_A), label_map(CUBE_A, two_voxels), challenge="MET")["num_fn"] == 0


def test_challenge_table_and_validation():
    assert CHALLENGES["PED"] == ChallengeParameters(dilation_iterations=3, lesion_volume_threshold_mm3=50.0)
    assert (CHALLENGES["MET"].dilation_iterations, CHALLENGES["MET"].lesion_volume_threshold_mm3) == (1, 2.0)
    assert sorted(CHALLENGES) == ["GLI", "MEN", "MET", "PED", "PED2024", "SSA"]
    assert CHALLENGES["PED2024"] == ChallengeParameters(
        dilation_iterations=5,
        lesion_volume_threshold_mm3=10.0,
        merge_predicted_lesions=True,
        small_predicted_lesion_voxels=10,
        whole_volume_on_lesion_ids=True,
        label_scheme="brats2024_ped",
    )
    assert {name for name, rules in CHALLENGES.items() if rules.label_scheme != "brats2023_ped"} == {"PED2024"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        CHALLENGES["PED"].dilation_iterations = 1
    with pytest.raises(
        InputError, match="unknown challenge 'BraTS-XYZ'; valid names: PED, GLI, SSA, MEN, MET, PED2024"
    ):
        compute_case_metrics(label_map(CUBE_A), label_map(CUBE_A), ISO, challenge="BraTS-XYZ")
    with pytest.raises(ValueError, match="dilation_iterations"):
        ChallengeParameters(dilation_iterations=0, lesion_volume_threshold_mm3=50.0)
    with pytest.raises(ValueError, match="small_predicted_lesion_voxels"):
        ChallengeParameters(dilation_iterations=1, lesion_volume_threshold_mm3=2.0, small_predicted_lesion_voxels=-1)
    with pytest.raises(ValueError, match="unknown label_scheme 'brats2025'"):
        ChallengeParameters(dilation_iterations=1, lesion_volume_threshold_mm3=2.0, label_scheme="brats2025")


@pytest.mark.parametrize(
    ("challenge", "scheme", "expected"),
    [
        (None, None, ("PED", "brats2023_ped")),  # neither: BraTS 2023 PED
        (None, "brats2024_ped", ("PED2024", "brats2024_ped")),  # a scheme brings its rules
        (None, "brats2021", ("GLI", "brats2021")),
        ("PED2024", None, ("PED2024", "brats2024_ped")),  # the 2024 rules bring the 2024 labels
        ("MEN", None, ("MEN", "brats2023_ped")),  # the 2023 sub-challenges share the 2023 labels
        ("PED", "brats2024_ped", ("PED", "brats2024_ped")),  # both named: both kept
    ],
)
def test_rules_and_label_scheme_default_to_each_other(challenge, scheme, expected):
    name, label_scheme = resolve_rules(challenge, scheme)
    assert (name, label_scheme.name) == expected
    assert resolve_rules(challenge, get_scheme(expected[1]))[1] is get_scheme(expected[1])


def test_unknown_rules_or_scheme_is_an_input_error_naming_the_valid_ones():
    with pytest.raises(InputError, match="valid names: PED, GLI, SSA, MEN, MET, PED2024"):
        resolve_rules("PED2025")
    with pytest.raises(InputError, match="unknown label_scheme 'brats2025'; valid: brats2023_ped, brats2024_ped"):
        resolve_rules(None, "brats2025")
    with pytest.raises(InputError, match="unknown challenge 'ped'"):
        resolve_rules("ped", "brats2023_ped")


def test_the_scheme_decides_the_regions_and_their_masks():
    # A 2024 map: label 1 is enhancing tumour there, non-enhancing core under 2023 labels.
    label = label_map(
        (4, (2, 4, 4), (8, 8, 8)), (2, (3, 5, 5), (6, 6, 6)), (3, (3, 5, 5), (2, 6, 6)), (1, (5, 7, 7), (4, 4, 4))
    )
    rows = compute_case_metrics(label, label, ISO, scheme="brats2024_ped")
    assert [row["region"] for row in rows] == ["ET", "TC", "WT", "NETC", "CC", "ED"]
    assert [row["gt_volume"] for row in rows] == [64.0, 216.0, 512.0, 80.0, 72.0, 296.0]
    assert all(list(row) == ["region", *METRIC_NAMES] for row in rows)
    assert [row["region"] for row in compute_case_metrics(label, label, ISO, challenge="PED")] == ["ET", "TC", "WT"]


def test_rejects_mismatched_shapes_and_bad_spacing():
    with pytest.raises(ValueError, match="shape"):
        compute_case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), ISO)
    with pytest.raises(ValueError, match="voxel sizes"):
        compute_case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1.0, 1.0))


# ---- brute force: the official rules restated as directly as possible, on whole volumes ----


def reference_hd95(gt: np.ndarray, pred: np.ndarray, spacing) -> float:
    """Area-weighted 95th percentile of all corner-surfel distances, with every pairwise distance computed. Maps of
    lesion ids are read as the official library reads them: values and codes kept in a byte, modulo 256."""
    if not gt.any() or not pred.any():
        return MAX_HD95
    table = create_table_neighbour_code_to_surface_area(spacing)[0].numpy().astype(float)
    kernel = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]])

    def surfels(mask):
        # correlate() centres a 2-wide kernel on its second entry, so output i sees voxels i-1 and i: a corner.
        codes = ndimage.correlate(np.pad(mask.astype(int) % 256, 1), kernel, mode="constant")[1:, 1:, 1:] % 256
        on_surface = (codes != 0) & (codes != 255)
        return np.argwhere(on_surface) * np.asarray(spacing), table[codes[on_surface]]

    def percentile(distances, areas):
        accumulated, total = 0.0, areas.sum()
        for distance, area in sorted(zip(distances, areas, strict=True)):
            accumulated += area
            if accumulated / total >= 0.95:
                return distance
        return max(distances)

    (gt_points, gt_areas), (pred_points, pred_areas) = surfels(gt), surfels(pred)
    if not len(gt_points) or not len(pred_points):
        return MAX_HD95
    distances = cdist(gt_points, pred_points)
    return max(percentile(distances.min(axis=1), gt_areas), percentile(distances.min(axis=0), pred_areas))


def reference_region(pred: np.ndarray, gt: np.ndarray, spacing, params: ChallengeParameters) -> dict:
    structure = ndimage.generate_binary_structure(3, 2)
    voxel_mm3 = spacing[0] * spacing[1] * spacing[2]
    dilated = cc3d.connected_components(ndimage.binary_dilation(gt, structure, params.dilation_iterations))
    predicted = cc3d.connected_components(pred, connectivity=26)
    lesions, matched_anywhere = [], set()
    for lesion_id in range(1, dilated.max() + 1):
        lesion = gt & (dilated == lesion_id)
        reach = ndimage.binary_dilation(lesion, structure, params.dilation_iterations)
        matched = set(np.unique(predicted[reach])) - {0}
        matched_anywhere |= matched
        matched_mask = np.isin(predicted, list(matched))
        dice = 2 * (lesion & matched_mask).sum() / (lesion.sum() + matched_mask.sum())
        if lesion.sum() * voxel_mm3 > params.lesion_volume_threshold_mm3:
            lesions.append((bool(matched), dice, reference_hd95(lesion, matched_mask, spacing)))
    num_fp = len(set(np.unique(predicted)) - {0} - matched_anywhere)
    count = len(lesions) + num_fp
    return {
        "legacy_dice": 1.0 if not (gt.any() or pred.any()) else 2 * (gt & pred).sum() / (gt.sum() + pred.sum()),
        "legacy_hd95": 0.0 if not (gt.any() or pred.any()) else reference_hd95(gt, pred, spacing),
        "lesionwise_dice": sum(d for _, d, _ in lesions) / count if count else 1.0,
        "lesionwise_hd95": (sum(h for _, _, h in lesions) + 374 * num_fp) / count if count else 0.0,
        "num_tp": sum(m for m, _, _ in lesions),
        "num_fp": num_fp,
        "num_fn": sum(not m for m, _, _ in lesions),
        "gt_volume": gt.sum() * voxel_mm3,
    }


def random_label_map(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Blobby nested labels from thresholded smooth noise: several components per region, some touching the border."""
    noise = ndimage.gaussian_filter(rng.random(shape), sigma=rng.uniform(0.8, 1.6))
    levels = np.quantile(noise, [0.9, 0.95, 0.975])
    return np.select([noise > levels[2], noise > levels[1], noise > levels[0]], [3, 1, 2], 0).astype(np.uint8)


@pytest.mark.parametrize("seed", range(8))
def test_matches_brute_force_restatement_of_the_rules(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(14, 26, 3))
    gt = random_label_map(rng, shape)
    pred = random_label_map(rng, shape) if seed % 2 else np.where(rng.random(shape) < 0.15, 0, np.roll(gt, 1, 0))
    spacing = [(1.0, 1.0, 1.0), (0.9, 1.1, 2.5), (0.5, 0.5, 3.0)][seed % 3]
    challenge = ["PED", "MEN", "MET"][seed % 3]
    rows = compute_case_metrics(pred, gt, spacing, challenge)
    regions = {"ET": (3,), "TC": (1, 3), "WT": (1, 2, 3)}
    for row in rows:
        labels = regions[row["region"]]
        expected = reference_region(np.isin(pred, labels), np.isin(gt, labels), spacing, CHALLENGES[challenge])
        for name, value in expected.items():
            assert row[name] == pytest.approx(value, rel=1e-9, abs=1e-9), (row["region"], name)


# ---- golden cases: the official scorer's numbers ----


def golden_cases(scheme: str) -> Iterator[tuple[str, np.ndarray, np.ndarray, tuple[float, ...], dict]]:
    """(name, prediction, GT, voxel size, {region: {official column: value}}) of each golden case of a scheme."""
    folder = GOLDEN_DIR / scheme
    for name, expected in json.loads((folder / "expected.json").read_text()).items():
        case = name.split("__")[1]
        gt_image = nib.load(folder / "gt" / f"{case}-seg.nii.gz")
        pred = np.asanyarray(nib.load(folder / "pred" / f"{name}.nii.gz").dataobj)
        yield name, pred, np.asanyarray(gt_image.dataobj), gt_image.header.get_zooms()[:3], expected


def assert_official_numbers(name: str, rows: list[dict], expected: dict) -> None:
    """Every metric of every region exactly as the official scorer wrote it (its counts are floats)."""
    assert {row["region"] for row in rows} == set(expected)
    for row in rows:
        official = expected[row["region"]]
        assert {metric: row[metric] for metric in METRIC_NAMES} == {
            metric: official[column] for metric, column in OFFICIAL_COLUMNS.items()
        }, (name, row["region"])


@pytest.mark.skipif(not GOLDEN_DIR.is_dir(), reason=f"no golden cases in {GOLDEN_DIR}")
def test_2023_pediatric_metrics_are_the_official_scorers_numbers():
    cases = list(golden_cases("brats2023_ped"))
    assert len(cases) == 8
    for name, pred, gt, spacing, expected in cases:
        assert_official_numbers(name, compute_case_metrics(pred, gt, spacing, challenge="PED"), expected)


@pytest.mark.parametrize("challenge", ["PED", "PED2024"])
def test_without_hd95_every_other_metric_is_unchanged(challenge):
    """hd95=False (what a search over post-processing uses) reports NaN for both HD95 and the same everything else."""
    rng = np.random.default_rng(3)
    scheme = "brats2024_ped" if challenge == "PED2024" else "brats2023_ped"
    gt, pred = random_label_map(rng, (20, 22, 18)), random_label_map(rng, (20, 22, 18))
    full = compute_case_metrics(pred, gt, ISO, challenge, scheme)
    fast = compute_case_metrics(pred, gt, ISO, challenge, scheme, hd95=False)
    for full_row, fast_row in zip(full, fast, strict=True):
        assert np.isnan(fast_row.pop("legacy_hd95")) and np.isnan(fast_row.pop("lesionwise_hd95"))
        assert fast_row == {name: value for name, value in full_row.items() if not name.endswith("hd95")}
