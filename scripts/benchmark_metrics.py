"""Time ``compute_case_metrics`` on synthetic full-size BraTS cases (240 x 240 x 155, several lesions per region).

python -m scripts.benchmark_metrics [--num_cases 5] [--seed 0] [--challenge PED]
"""

from __future__ import annotations

import time

import fire
import numpy as np
from scipy import ndimage

from scripts.labels import labels_to_regions, regions_to_labels
from scripts.metrics import compute_case_metrics

BRATS_SHAPE = (240, 240, 155)


def noisy_ellipsoid(rng: np.random.Generator, radii: np.ndarray, roughness: float = 0.3) -> np.ndarray:
    """Boolean blob with the given radii (voxels) and a smoothly perturbed boundary, centred in its own box."""
    half = np.ceil(radii * (1 + roughness)).astype(int) + 1
    grids = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    radius = np.sqrt(sum((grid / r) ** 2 for grid, r in zip(grids, radii, strict=True)))
    noise = ndimage.gaussian_filter(rng.standard_normal(radius.shape), sigma=max(float(radii.min()) / 3, 1.0))
    noise /= np.abs(noise).max() + 1e-12
    return radius < 1 + roughness * noise


def paste(volume: np.ndarray, mask: np.ndarray, centre: np.ndarray, value: int) -> None:
    """Write ``value`` into ``volume`` where ``mask`` (centred on ``centre``) is set, clipped to the volume."""
    start = centre - np.asarray(mask.shape) // 2
    target, source = [], []
    for lo, size, limit in zip(start, mask.shape, volume.shape, strict=True):
        first, last = max(lo, 0), min(lo + size, limit)
        target.append(slice(first, last))
        source.append(slice(first - lo, last - lo))
    volume[tuple(target)][mask[tuple(source)]] = value


def draw_tumour(volume: np.ndarray, rng: np.random.Generator, centre: np.ndarray, radius: float) -> None:
    """Nested tumour: edema (2) around a core (1) whose rim is patchy enhancing tumour (3); ``rng`` fixes its shape."""
    radii = radius * rng.uniform(0.8, 1.2, 3)
    paste(volume, noisy_ellipsoid(rng, radii), centre, 2)
    paste(volume, noisy_ellipsoid(rng, radii * 0.55), centre, 1)
    rim = noisy_ellipsoid(rng, radii * 0.5)
    inner = _centre_crop(noisy_ellipsoid(rng, radii * 0.35), rim.shape)
    patches = ndimage.gaussian_filter(rng.standard_normal(rim.shape), sigma=2.0) > 0.05
    paste(volume, rim & ~inner & patches, centre, 3)


def _centre_crop(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-pad or crop ``mask`` around its centre to ``shape``."""
    out = np.zeros(shape, dtype=bool)
    paste(out, mask, np.asarray(shape) // 2, True)
    return out


def perturbed(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible prediction of ``label``: region boundaries grown or shrunk by a voxel in smooth random patches."""
    box = tuple(slice(max(a.min() - 4, 0), a.max() + 5) for a in np.nonzero(label))
    field = ndimage.gaussian_filter(rng.standard_normal(label[box].shape), sigma=4.0)
    field /= field.std() + 1e-12
    regions = labels_to_regions(label[box])
    for index, region in enumerate(regions):
        grown, shrunk = ndimage.binary_dilation(region), ndimage.binary_erosion(region)
        regions[index] = np.where(field > 0.5, grown, np.where(field < -0.5, shrunk, region))
    prediction = np.zeros_like(label)
    prediction[box] = regions_to_labels(regions)[0]
    return prediction


def synthetic_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A GT label map with a main tumour and satellites, and a prediction that perturbs, misses and adds lesions."""
    gt, detected = np.zeros(BRATS_SHAPE, np.uint8), np.zeros(BRATS_SHAPE, np.uint8)
    lesions = [(rng.integers(80, 160, 3), rng.uniform(18, 30))]
    lesions += [(rng.integers(50, 190, 3), rng.uniform(3, 10)) for _ in range(rng.integers(2, 6))]
    for index, (centre, radius) in enumerate(lesions):
        centre = (centre * [1, 1, 0.65]).astype(int)
        seed = int(rng.integers(2**31))
        draw_tumour(gt, np.random.default_rng(seed), centre, radius)
        if index == 0 or rng.random() < 0.8:  # the main tumour is always found, a satellite now and then missed
            draw_tumour(detected, np.random.default_rng(seed), centre, radius)
    pred = perturbed(detected, rng)
    for _ in range(rng.integers(0, 4)):
        draw_tumour(pred, rng, (rng.integers(50, 190, 3) * [1, 1, 0.65]).astype(int), rng.uniform(2, 6))
    return gt, pred


def main(num_cases: int = 5, seed: int = 0, challenge: str = "PED") -> None:
    """Print the seconds ``compute_case_metrics`` takes per synthetic case, then their mean and max."""
    rng = np.random.default_rng(seed)
    cases = [synthetic_case(rng) for _ in range(num_cases)]
    gt, pred = cases[0]
    compute_case_metrics(pred, gt, spacing=(1.0, 1.0, 1.0), challenge=challenge)  # warm-up: first-call caches
    seconds = []
    for index, (gt, pred) in enumerate(cases):
        start = time.perf_counter()
        rows = compute_case_metrics(pred, gt, spacing=(1.0, 1.0, 1.0), challenge=challenge)
        seconds.append(time.perf_counter() - start)
        scores = ", ".join(
            f"{r['region']} {r['legacy_dice']:.2f} {r['lesionwise_dice']:.2f} {r['num_tp']}/{r['num_fp']}/{r['num_fn']}"
            for r in rows
        )
        print(f"case {index}: {seconds[-1]:.3f} s  (region, legacy Dice, lesion-wise Dice, TP/FP/FN: {scores})")
    print(f"per case: mean {np.mean(seconds):.3f} s, max {np.max(seconds):.3f} s over {num_cases} cases")


if __name__ == "__main__":
    fire.Fire(main)
