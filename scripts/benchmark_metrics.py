"""Time ``compute_case_metrics`` on full-size synthetic BraTS-PED cases (240 x 240 x 155).

The ground truth comes from ``scripts.synthetic`` in the chosen label scheme; the prediction perturbs its boundaries,
misses a tumour now and then and adds small false-positive lesions, so every lesion-wise path is exercised.

python -m scripts.benchmark_metrics [--num_cases 5] [--seed 0] [--label_scheme brats2023_ped] [--challenge PED]
"""

from __future__ import annotations

import sys
import time

import cc3d
import fire
import numpy as np
from scipy import ndimage

from scripts.errors import InputError
from scripts.labels import LabelScheme
from scripts.metrics import compute_case_metrics, resolve_rules
from scripts.synthetic import make_case


def perturbed(label: np.ndarray, scheme: LabelScheme, rng: np.random.Generator) -> np.ndarray:
    """A plausible prediction of ``label``: region boundaries grown or shrunk by a voxel in smooth random patches."""
    box = tuple(slice(max(a.min() - 4, 0), a.max() + 5) for a in np.nonzero(label))
    field = ndimage.gaussian_filter(rng.standard_normal(label[box].shape), sigma=4.0)
    field /= field.std() + 1e-12
    regions = scheme.labels_to_regions(label[box])
    for index, region in enumerate(regions):
        grown, shrunk = ndimage.binary_dilation(region), ndimage.binary_erosion(region)
        regions[index] = np.where(field > 0.5, grown, np.where(field < -0.5, shrunk, region))
    prediction = np.zeros_like(label)
    prediction[box] = scheme.regions_to_labels(regions)[0]
    return prediction


def synthetic_case(scheme: LabelScheme, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(ground truth, prediction): perturbed, may miss the smallest tumour, adds 0-3 small false lesions."""
    _, gt, _ = make_case(rng, label_scheme=scheme)
    pred = perturbed(gt, scheme, rng)
    tumours, count = cc3d.connected_components(gt > 0, connectivity=26, return_N=True)
    if count > 1 and rng.random() < 0.5:
        pred[tumours == 1 + np.argmin(np.bincount(tumours.ravel())[1:])] = 0
    grid = np.indices(gt.shape, sparse=True)
    for _ in range(rng.integers(0, 4)):
        centre, radius = rng.integers((40, 40, 20), (200, 200, 135)), rng.uniform(2, 5)
        ball = sum((axis - c) ** 2 for axis, c in zip(grid, centre, strict=True)) <= radius**2
        pred[ball & (pred == 0)] = rng.choice(sorted(scheme.labels))
    return gt, pred


def main(num_cases: int = 5, seed: int = 0, label_scheme: str | None = None, challenge: str | None = None) -> None:
    """Print the seconds ``compute_case_metrics`` takes per synthetic case, then their mean and max."""
    try:
        challenge, scheme = resolve_rules(challenge, label_scheme)
    except InputError as error:
        sys.exit(f"benchmark_metrics: {error}")
    rng = np.random.default_rng(seed)
    cases = [synthetic_case(scheme, rng) for _ in range(num_cases)]
    print(f"labels {scheme.name}, official {challenge} rules")

    def score(gt: np.ndarray, pred: np.ndarray) -> list[dict]:
        return compute_case_metrics(pred, gt, spacing=(1.0, 1.0, 1.0), challenge=challenge, scheme=scheme)

    score(*cases[0])  # warm-up: first-call caches
    seconds = []
    for index, (gt, pred) in enumerate(cases):
        start = time.perf_counter()
        rows = score(gt, pred)
        seconds.append(time.perf_counter() - start)
        scores = ", ".join(
            f"{r['region']} {r['legacy_dice']:.2f} {r['lesionwise_dice']:.2f} {r['num_tp']}/{r['num_fp']}/{r['num_fn']}"
            for r in rows
        )
        print(f"case {index}: {seconds[-1]:.3f} s  (region, legacy Dice, lesion-wise Dice, TP/FP/FN: {scores})")
    print(f"per case: mean {np.mean(seconds):.3f} s, max {np.max(seconds):.3f} s over {num_cases} cases")


if __name__ == "__main__":
    fire.Fire(main)
