"""Official BraTS 2023 per-case metrics: legacy and lesion-wise Dice and HD95 for ET, TC and WT.

Follows the rules of the official 2023 scorer (public repository ``rachitsaluja/BraTS-2023-Metrics``), edge cases
included, at a fraction of its cost: every computation is cropped to the tumour, and each GT lesion's dilation is read
off the components of the dilated GT instead of being recomputed lesion by lesion.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType

import cc3d
import numpy as np
from monai.metrics.utils import get_code_to_measure_table
from scipy import ndimage
from scipy.spatial import cKDTree

from scripts.labels import REGION_LABELS

REPORTED_REGIONS = ("ET", "TC", "WT")
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
# The official sensitivity / specificity add machine epsilon to the denominators; kept so that values match bit for bit.
_EPS = float(np.finfo(float).eps)


@dataclass(frozen=True)
class ChallengeParameters:
    """Lesion-wise settings of one BraTS 2023 sub-challenge."""

    dilation_iterations: int  # 18-neighbour dilations that merge nearby GT components and reach matching predictions
    lesion_volume_threshold_mm3: float  # GT lesions of at most this volume are left out of the lesion-wise score

    def __post_init__(self) -> None:
        # scipy reads 0 iterations as "dilate until nothing changes", which would merge every lesion.
        if self.dilation_iterations < 1:
            raise ValueError(f"dilation_iterations must be >= 1, got {self.dilation_iterations}")


CHALLENGES = MappingProxyType(
    {
        "PED": ChallengeParameters(dilation_iterations=3, lesion_volume_threshold_mm3=50.0),
        "GLI": ChallengeParameters(dilation_iterations=3, lesion_volume_threshold_mm3=50.0),
        "SSA": ChallengeParameters(dilation_iterations=3, lesion_volume_threshold_mm3=50.0),
        "MEN": ChallengeParameters(dilation_iterations=1, lesion_volume_threshold_mm3=50.0),
        "MET": ChallengeParameters(dilation_iterations=1, lesion_volume_threshold_mm3=2.0),
    }
)


def get_challenge(name: str) -> ChallengeParameters:
    """Parameters of a 2023 sub-challenge by name (PED, GLI, SSA, MEN, MET)."""
    if name not in CHALLENGES:
        raise ValueError(f"unknown challenge {name!r}; valid names: {', '.join(CHALLENGES)}")
    return CHALLENGES[name]


def compute_case_metrics(
    pred_label: np.ndarray, gt_label: np.ndarray, spacing: Sequence[float], challenge: str = "PED"
) -> list[dict]:
    """Official 2023 metrics of one case: one dict per region (ET, TC, WT) with the keys ``region`` + METRIC_NAMES.

    ``pred_label`` and ``gt_label`` are 2023 label maps on the same grid; ``spacing`` is the voxel size in mm.
    """
    params = get_challenge(challenge)
    pred_label, gt_label = np.asarray(pred_label), np.asarray(gt_label)
    if pred_label.ndim != 3 or pred_label.shape != gt_label.shape:
        raise ValueError(f"expected two 3-D label maps of one shape, got {pred_label.shape} and {gt_label.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"expected 3 positive voxel sizes in mm, got {spacing}")
    # Everything outside the foreground box (plus room for the GT dilation) is background in every region.
    box = _bounding_box((pred_label != 0) | (gt_label != 0), margin=params.dilation_iterations + 1)
    if box is None:
        box = (slice(0, 0),) * 3
    pred_crop, gt_crop = pred_label[box], gt_label[box]
    return [
        {
            "region": region,
            **_region_metrics(
                np.isin(pred_crop, REGION_LABELS[region]),
                np.isin(gt_crop, REGION_LABELS[region]),
                spacing,
                params,
                total_voxels=gt_label.size,
            ),
        }
        for region in REPORTED_REGIONS
    ]


def surface_hd95(gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> float:
    """Robust Hausdorff distance (95th percentile, mm) between two masks' surfaces, surfels weighted by area.

    DeepMind's surface-distance method, as used by the official scorer; MAX_HD95 when either mask is empty.
    """
    if not gt.any() or not pred.any():
        return MAX_HD95
    spacing = tuple(float(s) for s in spacing)
    box = _bounding_box(gt | pred, margin=0)
    gt_points, gt_areas = _surface_elements(gt[box], spacing)
    pred_points, pred_areas = _surface_elements(pred[box], spacing)
    gt_to_pred = cKDTree(pred_points).query(gt_points)[0]
    pred_to_gt = cKDTree(gt_points).query(pred_points)[0]
    return max(_area_weighted_percentile(gt_to_pred, gt_areas), _area_weighted_percentile(pred_to_gt, pred_areas))


@functools.lru_cache(maxsize=16)
def _surfel_area_table(spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """MONAI's table of surfel area (mm^2) per 2x2x2 neighbour code, and the kernel that encodes those codes."""
    table, kernel = get_code_to_measure_table(spacing)
    return table.numpy().astype(np.float64), kernel.numpy().reshape(2, 2, 2).astype(np.uint8)


def _surface_elements(mask: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Positions (mm) and areas (mm^2) of the surface elements of ``mask``, which sit on the corners of its voxels."""
    table, kernel = _surfel_area_table(spacing)
    # The zero layer closes surfaces that touch the crop; summing shifted slices is much faster than torch's conv3d.
    padded = np.pad(mask, 1).astype(np.uint8)
    corners = tuple(size - 1 for size in padded.shape)
    codes = np.zeros(corners, dtype=np.uint8)
    for (i, j, k), weight in np.ndenumerate(kernel):
        codes += padded[i : i + corners[0], j : j + corners[1], k : k + corners[2]] * weight
    on_surface = (codes != 0) & (codes != 255)
    return np.argwhere(on_surface) * np.asarray(spacing), table[codes[on_surface]]


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


def _region_metrics(
    pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...], params: ChallengeParameters, total_voxels: int
) -> dict:
    """All metrics of one region from its binary prediction and GT masks (cropped; ``total_voxels`` is uncropped)."""
    num_pred, num_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    num_both = int(np.count_nonzero(pred & gt))
    sensitivity, specificity = _sensitivity_specificity(num_pred, num_gt, num_both, total_voxels)
    if num_pred == 0 and num_gt == 0:
        legacy_dice, legacy_hd95 = 1.0, 0.0
        lesionwise = {"lesionwise_dice": 1.0, "lesionwise_hd95": 0.0, "num_tp": 0, "num_fp": 0, "num_fn": 0}
    else:
        legacy_dice = 2.0 * num_both / (num_pred + num_gt)
        legacy_hd95 = surface_hd95(gt, pred, spacing)
        lesionwise = _lesionwise_metrics(pred, gt, spacing, params, whole_case=(legacy_dice, legacy_hd95))
    return {
        "legacy_dice": legacy_dice,
        "legacy_hd95": legacy_hd95,
        **lesionwise,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "gt_volume": _volume_mm3(num_gt, spacing),
    }


def _volume_mm3(num_voxels: int, spacing: tuple[float, ...]) -> float:
    """Volume of ``num_voxels`` voxels, multiplied in the official order so that the threshold test agrees exactly."""
    return num_voxels * spacing[0] * spacing[1] * spacing[2]


def _sensitivity_specificity(num_pred: int, num_gt: int, num_both: int, total_voxels: int) -> tuple[float, float]:
    """Voxel-wise sensitivity and specificity as the official scorer reports them (sensitivity 1 if both empty)."""
    false_pos, false_neg = num_pred - num_both, num_gt - num_both
    true_neg = total_voxels - (num_pred + num_gt - num_both)
    sensitivity = 1.0 if num_pred == 0 and num_gt == 0 else num_both / (num_both + false_neg + _EPS)
    return sensitivity, true_neg / (true_neg + false_pos + _EPS)


def _lesionwise_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: tuple[float, ...],
    params: ChallengeParameters,
    whole_case: tuple[float, float],
) -> dict:
    """Lesion-wise Dice / HD95 and lesion TP / FP / FN counts of one region.

    ``whole_case`` (legacy Dice, HD95) is reused when a single lesion is the whole GT and matches the whole prediction.
    """
    # A GT lesion is the GT inside one component of the dilated GT. Dilation distributes over union, so that component
    # is exactly the lesion's own dilation: no per-lesion dilation is needed.
    dilated = ndimage.binary_dilation(gt, _DILATION_STRUCTURE, iterations=params.dilation_iterations)
    dilated_labels, num_lesions = cc3d.connected_components(dilated, connectivity=26, return_N=True)
    lesion_labels = np.where(gt, dilated_labels, 0).astype(dilated_labels.dtype)
    pred_labels, num_components = cc3d.connected_components(pred, connectivity=26, return_N=True)
    matches = _matched_components(dilated_labels, pred_labels, num_lesions, num_components)
    lesion_stats, pred_stats = cc3d.statistics(lesion_labels), cc3d.statistics(pred_labels)

    scores, num_tp, num_fn = [], 0, 0
    for lesion, components in enumerate(matches, start=1):
        if _volume_mm3(int(lesion_stats["voxel_counts"][lesion]), spacing) <= params.lesion_volume_threshold_mm3:
            continue
        if components.size == 0:
            num_fn += 1
            scores.append((0.0, MAX_HD95))
        elif num_lesions == 1 and components.size == num_components:
            num_tp += 1
            scores.append(whole_case)
        else:
            num_tp += 1
            scores.append(
                _lesion_scores(lesion, components, lesion_labels, pred_labels, lesion_stats, pred_stats, spacing)
            )

    num_matched_components = np.unique(np.concatenate(matches)).size if matches else 0
    num_fp = num_components - num_matched_components
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


def _matched_components(
    dilated_labels: np.ndarray, pred_labels: np.ndarray, num_lesions: int, num_components: int
) -> list[np.ndarray]:
    """For each lesion (1..num_lesions), the sorted ids of the predicted components touching its dilation."""
    if num_lesions == 0:
        return []
    touching = (dilated_labels > 0) & (pred_labels > 0)
    stride = num_components + 1
    pairs = np.unique(dilated_labels[touching].astype(np.int64) * stride + pred_labels[touching])
    lesion_of_pair, component_of_pair = pairs // stride, pairs % stride
    boundaries = np.searchsorted(lesion_of_pair, np.arange(1, num_lesions), side="right")
    return np.split(component_of_pair, boundaries)


def _lesion_scores(
    lesion: int,
    components: np.ndarray,
    lesion_labels: np.ndarray,
    pred_labels: np.ndarray,
    lesion_stats: dict,
    pred_stats: dict,
    spacing: tuple[float, ...],
) -> tuple[float, float]:
    """(Dice, HD95) between one lesion and the union of its matched components, within their joint bounding box."""
    boxes = [lesion_stats["bounding_boxes"][lesion], *(pred_stats["bounding_boxes"][c] for c in components)]
    box = tuple(slice(min(b[axis].start for b in boxes), max(b[axis].stop for b in boxes)) for axis in range(3))
    lesion_mask = lesion_labels[box] == lesion
    is_matched = np.zeros(len(pred_stats["voxel_counts"]), dtype=bool)
    is_matched[components] = True
    matched_mask = is_matched[pred_labels[box]]
    intersection = int(np.count_nonzero(lesion_mask & matched_mask))
    lesion_size = int(lesion_stats["voxel_counts"][lesion])
    matched_size = int(pred_stats["voxel_counts"][components].sum())
    dice = 2.0 * intersection / (lesion_size + matched_size)
    return dice, surface_hd95(lesion_mask, matched_mask, spacing)
