"""Official BraTS per-case metrics: legacy and lesion-wise Dice and HD95 of every region a label scheme scores.

Follows the official scorers' rules, edge cases included, at a fraction of their cost: the 2023 sub-challenges'
(public repository ``rachitsaluja/BraTS-2023-Metrics``: PED, GLI, SSA, MEN, MET) and the 2024 pediatric one
(``rachitsaluja/BraTS-2024-Metrics``, ``metrics_PED.py``: PED2024). Every computation is cropped to the region, and
each GT lesion's dilation is read off the components of the dilated GT instead of being recomputed lesion by lesion.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import cc3d
import numpy as np
from monai.metrics.utils import get_code_to_measure_table
from scipy import ndimage
from scipy.spatial import cKDTree

from scripts.errors import InputError
from scripts.labels import DEFAULT_SCHEME, SCHEMES, LabelScheme, get_scheme

METRIC_NAMES = (
    "legacy_dice",
    "legacy_hd95",
    "lesionwise_dice",
    "lesionwise_hd95",
    "num_tp",
    "num_fp",
    "num_fn",
    "sensitivity",
    "specificity",
    "gt_volume",
)
# The official stand-in for an undefined distance: about the diagonal of the 240 x 240 x 155 mm BraTS volume.
MAX_HD95 = 374.0
HD_PERCENTILE = 95.0
_DILATION_STRUCTURE = ndimage.generate_binary_structure(3, 2)
# The official sensitivity / specificity add these to their denominators (2023: machine epsilon, 2024: the smallest
# normal float); kept so that values match bit for bit.
_EPS = float(np.finfo(float).eps)
_TINY = sys.float_info.min
# Queried surface corners per corner of the crop above which a distance transform beats nearest-neighbour queries.
_DENSE_CORNER_FRACTION = 0.05
# Both masks of a region empty: perfect scores, no lesions, no volume (what both official scorers report).
_NOTHING_TO_SCORE = MappingProxyType(
    {
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
)

# What compute_case_metrics(hd95=False) reports as HD95 (even where the rules fix a value, e.g. 374 for a miss).
_NO_HD95 = MappingProxyType({"legacy_hd95": float("nan"), "lesionwise_hd95": float("nan")})
# HD95 between two masks (or maps of lesion ids) given the voxel size in mm: surface_hd95, or _no_distance.
Distance = Callable[[np.ndarray, np.ndarray, Sequence[float]], float]


@dataclass(frozen=True)
class ChallengeParameters:
    """Lesion-wise rules of one official BraTS scorer."""

    dilation_iterations: int  # 18-neighbour dilations that merge nearby GT components and reach matching predictions
    lesion_volume_threshold_mm3: float  # GT lesions of at most this volume are left out of the lesion-wise score
    # 2024 PED: predicted components are merged into predicted lesions by the same dilations as GT components...
    merge_predicted_lesions: bool = False
    # ... and predicted lesions of at most this many voxels (a count, not mm^3) are erased before anything, legacy
    # metrics included, is computed; 0: none.
    small_predicted_lesion_voxels: int = 0
    # 2024 PED: legacy HD95, sensitivity and specificity are computed on the maps of lesion ids, not on masks; see
    # surface_hd95 and _lesion_id_sensitivity_specificity for what that gives.
    whole_volume_on_lesion_ids: bool = False
    label_scheme: str = DEFAULT_SCHEME  # the labels of this challenge's data: the scheme scored when none is named

    def __post_init__(self) -> None:
        # scipy reads 0 iterations as "dilate until nothing changes", which would merge every lesion.
        if self.dilation_iterations < 1:
            raise ValueError(f"dilation_iterations must be >= 1, got {self.dilation_iterations}")
        if self.small_predicted_lesion_voxels < 0:
            raise ValueError(f"small_predicted_lesion_voxels must be >= 0, got {self.small_predicted_lesion_voxels}")
        if self.label_scheme not in SCHEMES:
            raise ValueError(f"unknown label_scheme {self.label_scheme!r}; valid: {', '.join(SCHEMES)}")

    def description(self) -> str:
        """The rules in one line, for reports."""
        parts = [
            f"GT lesions merged and matched by {self.dilation_iterations} dilation(s), "
            f"scored if over {self.lesion_volume_threshold_mm3:g} mm^3"
        ]
        if self.merge_predicted_lesions:
            parts.append("predicted lesions merged alike")
        if self.small_predicted_lesion_voxels:
            parts.append(f"predicted lesions of <= {self.small_predicted_lesion_voxels} voxels erased before scoring")
        return "; ".join(parts)


CHALLENGES = MappingProxyType(
    {
        "PED": ChallengeParameters(dilation_iterations=3, lesion_volume_threshold_mm3=50.0),
        "GLI": ChallengeParameters(dilation_iterations=3, lesion_volume_threshold_mm3=50.0),
        "SSA": ChallengeParameters(dilation_iterations=3, lesion_volume_threshold_mm3=50.0),
        "MEN": ChallengeParameters(dilation_iterations=1, lesion_volume_threshold_mm3=50.0),
        "MET": ChallengeParameters(dilation_iterations=1, lesion_volume_threshold_mm3=2.0),
        "PED2024": ChallengeParameters(
            dilation_iterations=5,
            lesion_volume_threshold_mm3=10.0,
            merge_predicted_lesions=True,
            small_predicted_lesion_voxels=10,
            whole_volume_on_lesion_ids=True,
            label_scheme="brats2024_ped",
        ),
    }
)


def get_challenge(name: str) -> ChallengeParameters:
    """Rules of an official scorer by name: the 2023 sub-challenges PED, GLI, SSA, MEN, MET, or PED2024."""
    if name not in CHALLENGES:
        raise InputError(f"unknown challenge {name!r}; valid names: {', '.join(CHALLENGES)}")
    return CHALLENGES[name]


def resolve_rules(challenge: str | None = None, scheme: str | LabelScheme | None = None) -> tuple[str, LabelScheme]:
    """(challenge name, label scheme) to score with. A name given is used; a missing one follows from the other (a
    scheme's ``metric_rules``, a challenge's ``label_scheme``); neither: the default scheme and its rules.

    InputError naming the valid names for an unknown one.
    """
    if scheme is None:
        scheme = DEFAULT_SCHEME if challenge is None else get_challenge(challenge).label_scheme
    scheme = get_scheme(scheme)
    challenge = scheme.metric_rules if challenge is None else challenge
    get_challenge(challenge)
    return challenge, scheme


def compute_case_metrics(
    pred_label: np.ndarray,
    gt_label: np.ndarray,
    spacing: Sequence[float],
    challenge: str | None = None,
    scheme: str | LabelScheme | None = None,
    hd95: bool = True,
    regions: Sequence[str] | None = None,
) -> list[dict]:
    """Official metrics of one case: one dict per region the scheme scores, in its order, with the keys ``region`` +
    METRIC_NAMES. ``challenge`` and ``scheme`` default to each other (``resolve_rules``). ``regions``, a subset of the
    scored regions, limits the work to those (each region's metrics depend on its own masks alone).

    ``pred_label`` and ``gt_label`` are label maps of the scheme on the same grid; ``spacing`` is the voxel size in mm.
    ``hd95`` False computes no distance and reports both HD95 as NaN: the distances take most of the time, and a
    search over post-processing that ranks by Dice needs none of them.
    """
    challenge, scheme = resolve_rules(challenge, scheme)
    params = CHALLENGES[challenge]
    pred_label, gt_label = np.asarray(pred_label), np.asarray(gt_label)
    if pred_label.ndim != 3 or pred_label.shape != gt_label.shape:
        raise ValueError(f"expected two 3-D label maps of one shape, got {pred_label.shape} and {gt_label.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"expected 3 positive voxel sizes in mm, got {spacing}")
    if regions is not None and not set(regions) <= set(scheme.scored_regions):
        raise ValueError(f"regions {list(regions)} are not all among {scheme.name}'s {list(scheme.scored_regions)}")
    # Everything outside the foreground box (plus room for the dilations) is background in every region.
    box = _bounding_box((pred_label != 0) | (gt_label != 0), margin=crop_margin(params)) or (slice(0, 0),) * 3
    pred_crop, gt_crop = pred_label[box], gt_label[box]
    return [
        {
            "region": region,
            **_region_metrics(
                scheme.region_mask(pred_crop, region),
                scheme.region_mask(gt_crop, region),
                spacing,
                params,
                total_voxels=gt_label.size,
                distance=surface_hd95 if hd95 else _no_distance,
            ),
            **({} if hd95 else _NO_HD95),
        }
        for region in scheme.scored_regions
        if regions is None or region in regions
    ]


def surface_hd95(gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> float:
    """Robust Hausdorff distance (95th percentile, mm) between two masks' surfaces, surfels weighted by area.

    DeepMind's surface-distance method, as used by the official scorers, distances computed as its distance transform
    computes them; MAX_HD95 when either has no surface. Given maps of lesion ids instead of masks, it reads them as the
    2024 scorer's copy of that library does: every voxel's id modulo 256 weighs into its corners' codes, so the inside
    of a lesion whose id is not 1 counts as surface too.
    """
    if not gt.any() or not pred.any():
        return MAX_HD95
    spacing = tuple(float(s) for s in spacing)
    box = _bounding_box(gt | pred, margin=0)
    gt_codes, pred_codes = _corner_codes(gt[box]), _corner_codes(pred[box])
    gt_surface, pred_surface = _on_surface(gt_codes), _on_surface(pred_codes)
    gt_corners, pred_corners = np.argwhere(gt_surface), np.argwhere(pred_surface)
    if not len(gt_corners) or not len(pred_corners):
        return MAX_HD95
    table = _surfel_area_table(spacing)
    gt_to_pred = _distances_to_surface(gt_corners, pred_surface, spacing)
    pred_to_gt = _distances_to_surface(pred_corners, gt_surface, spacing)
    return max(
        _area_weighted_percentile(gt_to_pred, table[gt_codes[gt_surface]]),
        _area_weighted_percentile(pred_to_gt, table[pred_codes[pred_surface]]),
    )


@functools.lru_cache(maxsize=16)
def _surfel_area_table(spacing: tuple[float, ...]) -> np.ndarray:
    """MONAI's table of surfel area (mm^2) per 2x2x2 neighbour code."""
    return get_code_to_measure_table(spacing)[0].numpy().astype(np.float64)


@functools.lru_cache(maxsize=1)
def _code_kernel() -> np.ndarray:
    """The weight of each voxel of a 2x2x2 neighbourhood in its corner's code, as MONAI's table numbers codes."""
    return get_code_to_measure_table((1.0, 1.0, 1.0))[1].numpy().reshape(2, 2, 2).astype(np.uint8)


def _corner_codes(mask: np.ndarray) -> np.ndarray:
    """The 2x2x2 neighbour code of every voxel corner of ``mask``, summed in uint8 as the official library sums them
    (which wraps around for values other than 0 and 1)."""
    kernel = _code_kernel()
    # The zero layer closes surfaces that touch the crop; summing shifted slices is much faster than torch's conv3d.
    padded = np.pad(mask, 1).astype(np.uint8)
    corners = tuple(size - 1 for size in padded.shape)
    codes = np.zeros(corners, dtype=np.uint8)
    for (i, j, k), weight in np.ndenumerate(kernel):
        codes += padded[i : i + corners[0], j : j + corners[1], k : k + corners[2]] * weight
    return codes


def _on_surface(codes: np.ndarray) -> np.ndarray:
    """Corners that carry a surface element: neither all outside (0) nor all inside (255)."""
    return (codes != 0) & (codes != 255)


def _distances_to_surface(corners: np.ndarray, surface: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distance (mm) from each corner (index triple) to the nearest ``surface`` corner, in the official arithmetic.

    Nearest-neighbour queries are faster for a thin surface; a feature transform of the whole crop is faster once the
    queried corners fill a good part of it, as the inside of a lesion-id map does.
    """
    scale = np.asarray(spacing)
    if len(corners) > _DENSE_CORNER_FRACTION * surface.size:
        features = ndimage.distance_transform_edt(
            ~surface, sampling=spacing, return_distances=False, return_indices=True
        )
        nearest = features[(slice(None), *corners.T)].T
    else:
        targets = np.argwhere(surface)
        nearest = targets[cKDTree(targets * scale).query(corners * scale)[1]]
    # As scipy's distance transform computes it: index offsets scaled, squared and summed axis by axis.
    offsets = (nearest - corners) * scale
    return np.sqrt(np.add.reduce(offsets * offsets, axis=1))


def _no_distance(gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> float:
    """No distance at all, for ``compute_case_metrics(hd95=False)``."""
    return float("nan")


def _area_weighted_percentile(distances: np.ndarray, areas: np.ndarray) -> float:
    """Smallest distance whose cumulative surfel-area fraction reaches HD_PERCENTILE (ties ordered by area)."""
    order = np.lexsort((areas, distances))
    sorted_distances, sorted_areas = distances[order], areas[order].astype(np.float64)
    cumulative = np.cumsum(sorted_areas) / np.sum(sorted_areas)
    index = int(np.searchsorted(cumulative, HD_PERCENTILE / 100.0))
    return float(sorted_distances[min(index, len(sorted_distances) - 1)])


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding ``mask``, grown by ``margin`` and clipped to the array; None if empty."""
    slices = []
    for axis, size in enumerate(mask.shape):
        other_axes = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other_axes))
        if present.size == 0:
            return None
        slices.append(slice(max(int(present[0]) - margin, 0), min(int(present[-1]) + 1 + margin, size)))
    return tuple(slices)


def crop_margin(params: ChallengeParameters) -> int:
    """Room around a crop that holds every dilation: an 18-neighbour dilation moves at most 1 voxel along an axis."""
    return params.dilation_iterations + 1


def _region_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: tuple[float, ...],
    params: ChallengeParameters,
    total_voxels: int,
    distance: Distance,
) -> dict:
    """All metrics of one region from its binary prediction and GT masks (cropped; ``total_voxels`` is uncropped),
    HD95 measured by ``distance``."""
    box = _bounding_box(pred | gt, margin=crop_margin(params))
    if box is None:
        return dict(_NOTHING_TO_SCORE)
    pred, gt = pred[box], gt[box]
    gt_lesions = _merged_lesions(gt, params.dilation_iterations)
    pred_lesions = _predicted_lesions(pred, params)
    if params.small_predicted_lesion_voxels:
        pred = pred_lesions > 0
    num_pred, num_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    if num_pred == 0 and num_gt == 0:  # (2024) the prediction was only small lesions
        return dict(_NOTHING_TO_SCORE)
    num_both = int(np.count_nonzero(pred & gt))
    legacy_dice = 2.0 * num_both / (num_pred + num_gt)
    if params.whole_volume_on_lesion_ids:
        sensitivity, specificity = _lesion_id_sensitivity_specificity(pred_lesions, gt_lesions.ids, total_voxels)
        legacy_hd95 = distance(gt_lesions.ids, pred_lesions, spacing)
        # Only maps of 0 and 1 give the masks' distance, which a lesion matching the whole prediction may reuse.
        whole_case = (legacy_dice, legacy_hd95) if gt_lesions.count <= 1 and pred_lesions.max() <= 1 else None
    else:
        sensitivity, specificity = _sensitivity_specificity(num_pred, num_gt, num_both, total_voxels)
        legacy_hd95 = distance(gt, pred, spacing)
        whole_case = (legacy_dice, legacy_hd95)
    lesionwise = _lesionwise_metrics(pred_lesions, gt_lesions, spacing, params, whole_case, distance)
    return {
        "legacy_dice": legacy_dice,
        "legacy_hd95": legacy_hd95,
        **lesionwise,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "gt_volume": _volume_mm3(num_gt, spacing),
    }


@dataclass(frozen=True)
class _MergedLesions:
    """Components of a mask merged by dilation: each lesion is the mask inside one component of the dilated mask."""

    dilated: np.ndarray  # component ids of the dilated mask; lesion i's component is exactly its own dilation
    ids: np.ndarray  # those ids on the mask's voxels, 0 elsewhere
    count: int


def _merged_lesions(mask: np.ndarray, iterations: int) -> _MergedLesions:
    """The lesions of ``mask``, numbered as the official scorers number them.

    Dilation distributes over union, so a component of the dilated mask is exactly its lesion's own dilation. cc3d
    numbers components in the order of their first voxel in memory, which cropping keeps; the official scorers hand
    it C-ordered masks.
    """
    dilated = ndimage.binary_dilation(mask, _DILATION_STRUCTURE, iterations=iterations)
    labels, count = cc3d.connected_components(np.ascontiguousarray(dilated), connectivity=26, return_N=True)
    return _MergedLesions(labels, np.where(mask, labels, 0).astype(labels.dtype), count)


def _predicted_lesions(pred: np.ndarray, params: ChallengeParameters) -> np.ndarray:
    """Ids of the predicted lesions (0: background): 26-connected components or (2024) components merged by
    dilation, then (2024) the small ones erased, the other ids kept as they were."""
    if params.merge_predicted_lesions:
        ids = _merged_lesions(pred, params.dilation_iterations).ids
    else:
        ids = cc3d.connected_components(pred, connectivity=26)
    if params.small_predicted_lesion_voxels:
        # Background may count as small too: erasing it changes nothing.
        small = np.bincount(ids.ravel()) <= params.small_predicted_lesion_voxels
        if small.any():
            ids = np.where(small[ids], 0, ids).astype(ids.dtype)
    return ids


def _volume_mm3(num_voxels: int, spacing: tuple[float, ...]) -> float:
    """Volume of ``num_voxels`` voxels, multiplied in the official order so that the threshold test agrees exactly."""
    return num_voxels * spacing[0] * spacing[1] * spacing[2]


def _sensitivity_specificity(num_pred: int, num_gt: int, num_both: int, total_voxels: int) -> tuple[float, float]:
    """Voxel-wise sensitivity and specificity as the official 2023 scorer reports them."""
    false_pos, false_neg = num_pred - num_both, num_gt - num_both
    true_neg = total_voxels - (num_pred + num_gt - num_both)
    return num_both / (num_both + false_neg + _EPS), true_neg / (true_neg + false_pos + _EPS)


def _lesion_id_sensitivity_specificity(
    pred_ids: np.ndarray, gt_ids: np.ndarray, total_voxels: int
) -> tuple[float, float]:
    """Sensitivity and specificity as the official 2024 PED scorer computes them, from the maps of lesion ids: a
    voxel agrees only where both ids are 1, the totals sum ids rather than count voxels, and a negative is any voxel
    where neither id is 1. Far from the voxel-wise values, but the official ones."""
    both_one = int(np.count_nonzero((pred_ids == 1) & (gt_ids == 1)))
    either_one = int(np.count_nonzero((pred_ids == 1) | (gt_ids == 1)))
    pred_total, gt_total = int(pred_ids.sum(dtype=np.int64)), int(gt_ids.sum(dtype=np.int64))
    false_pos, false_neg, true_neg = pred_total - both_one, gt_total - both_one, total_voxels - either_one
    return both_one / (both_one + false_neg + _TINY), true_neg / (true_neg + false_pos + _TINY)


def _lesionwise_metrics(
    pred_ids: np.ndarray,
    gt_lesions: _MergedLesions,
    spacing: tuple[float, ...],
    params: ChallengeParameters,
    whole_case: tuple[float, float] | None,
    distance: Distance,
) -> dict:
    """Lesion-wise Dice / HD95 and lesion TP / FP / FN counts of one region, from the ids of its predicted lesions.

    ``whole_case`` (legacy Dice, HD95), if given, is reused when a single lesion matches every predicted lesion.
    """
    pred_stats, lesion_stats = cc3d.statistics(pred_ids), cc3d.statistics(gt_lesions.ids)
    num_predicted = int(np.count_nonzero(pred_stats["voxel_counts"][1:]))
    matches = _matched_components(gt_lesions.dilated, pred_ids, gt_lesions.count)

    scores, num_tp, num_fn = [], 0, 0
    for lesion, components in enumerate(matches, start=1):
        if _volume_mm3(int(lesion_stats["voxel_counts"][lesion]), spacing) <= params.lesion_volume_threshold_mm3:
            continue
        if components.size == 0:
            num_fn += 1
            scores.append((0.0, MAX_HD95))
        elif whole_case is not None and gt_lesions.count == 1 and components.size == num_predicted:
            num_tp += 1
            scores.append(whole_case)
        else:
            num_tp += 1
            scores.append(
                _lesion_scores(
                    lesion, components, gt_lesions.ids, pred_ids, lesion_stats, pred_stats, spacing, distance
                )
            )

    num_matched = np.unique(np.concatenate(matches)).size if matches else 0
    num_fp = num_predicted - num_matched
    denominator = len(scores) + num_fp
    if denominator == 0:
        lesionwise_dice, lesionwise_hd95 = 1.0, 0.0
    else:
        lesionwise_dice = sum(dice for dice, _ in scores) / denominator
        lesionwise_hd95 = (sum(hd95 for _, hd95 in scores) + MAX_HD95 * num_fp) / denominator
    return {
        "lesionwise_dice": lesionwise_dice,
        "lesionwise_hd95": lesionwise_hd95,
        "num_tp": num_tp,
        "num_fp": num_fp,
        "num_fn": num_fn,
    }


def _matched_components(dilated_labels: np.ndarray, pred_ids: np.ndarray, num_lesions: int) -> list[np.ndarray]:
    """For each lesion (1..num_lesions), the sorted ids of the predicted lesions touching its dilation."""
    if num_lesions == 0:
        return []
    touching = (dilated_labels > 0) & (pred_ids > 0)
    stride = int(pred_ids.max()) + 1
    pairs = np.unique(dilated_labels[touching].astype(np.int64) * stride + pred_ids[touching])
    lesion_of_pair, component_of_pair = pairs // stride, pairs % stride
    boundaries = np.searchsorted(lesion_of_pair, np.arange(1, num_lesions), side="right")
    return np.split(component_of_pair, boundaries)


def _lesion_scores(
    lesion: int,
    components: np.ndarray,
    lesion_ids: np.ndarray,
    pred_ids: np.ndarray,
    lesion_stats: dict,
    pred_stats: dict,
    spacing: tuple[float, ...],
    distance: Distance,
) -> tuple[float, float]:
    """(Dice, HD95) between one lesion and the union of its matched predictions, within their joint bounding box."""
    boxes = [lesion_stats["bounding_boxes"][lesion], *(pred_stats["bounding_boxes"][c] for c in components)]
    box = tuple(slice(min(b[axis].start for b in boxes), max(b[axis].stop for b in boxes)) for axis in range(3))
    lesion_mask = lesion_ids[box] == lesion
    is_matched = np.zeros(len(pred_stats["voxel_counts"]), dtype=bool)
    is_matched[components] = True
    matched_mask = is_matched[pred_ids[box]]
    intersection = int(np.count_nonzero(lesion_mask & matched_mask))
    lesion_size = int(lesion_stats["voxel_counts"][lesion])
    matched_size = int(pred_stats["voxel_counts"][components].sum())
    dice = 2.0 * intersection / (lesion_size + matched_size)
    return dice, distance(lesion_mask, matched_mask, spacing)
