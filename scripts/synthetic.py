"""Synthetic BraTS-PED 2023 cases: MNI152 anatomy with irregular tumours, in the challenge layout.

Cases carry the BraTS geometry (240x240x155, 1 mm, LPS qform), naming and 2023 labels, so the
data pipeline, training and evaluation can be exercised end to end without the real data.
A smaller ``shape`` keeps the same field of view with coarser voxels, for fast tests.
"""

from __future__ import annotations

import functools
import shutil
import sys
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from scripts.cases import MODALITIES, TRAINING_FOLDER, VALIDATION_FOLDER, case_file_name

BRATS_SHAPE = (240, 240, 155)
BRATS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]])
# ITK (and so the BraTS preprocessing) writes both transforms with code 1, scanner anatomical.
XFORM_CODE = 1
NO_ET_FRACTION = 0.12  # 88 of 99 BraTS-PED training cases have enhancing tumour

# Mean intensity of each tissue and tumour sub-region per modality, before the per-case scale.
CONTRASTS = {
    "t1c": {"csf": 0.32, "gm": 0.72, "wm": 0.90, "edema": 0.62, "ncr": 0.48, "et": 1.45},
    "t1n": {"csf": 0.30, "gm": 0.70, "wm": 0.90, "edema": 0.62, "ncr": 0.45, "et": 0.65},
    "t2f": {"csf": 0.12, "gm": 0.62, "wm": 0.50, "edema": 0.95, "ncr": 0.70, "et": 0.80},
    "t2w": {"csf": 1.00, "gm": 0.62, "wm": 0.45, "edema": 0.88, "ncr": 0.95, "et": 0.70},
}
TUMOUR_LABELS = {"ncr": 1, "edema": 2, "et": 3}
# Where tumours overlap, the more specific sub-region wins: ET over NCR over edema.
LABEL_PRIORITY = np.array([0, 2, 1, 3], dtype=np.uint8)


def grid_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """Affine of a ``shape`` grid covering the BraTS field of view; equals the BraTS affine at 240x240x155."""
    spacing = np.array(BRATS_SHAPE) / np.array(shape)
    affine = BRATS_AFFINE.copy()
    affine[:3, :3] = BRATS_AFFINE[:3, :3] * spacing
    # Voxel corners, not centres, line up with the 1 mm grid's outer corners.
    fov_corner = BRATS_AFFINE[:3, :3] @ np.full(3, -0.5) + BRATS_AFFINE[:3, 3]
    affine[:3, 3] = fov_corner + affine[:3, :3] @ np.full(3, 0.5)
    return affine


@functools.lru_cache(maxsize=1)
def _mni_maps() -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """Brain mask, GM and WM probability maps of nilearn's offline MNI152 template as a (1, 3, X, Y, Z)
    tensor, their affine and the brain's voxel bounding box (loaded once per process)."""
    from nilearn import datasets

    loaders = (datasets.load_mni152_brain_mask, datasets.load_mni152_gm_template, datasets.load_mni152_wm_template)
    images = [load(resolution=1) for load in loaders]
    maps = np.stack([np.asarray(img.get_fdata(), dtype=np.float32) for img in images])
    brain_voxels = np.argwhere(maps[0] > 0.5)
    return torch.from_numpy(maps)[None], images[0].affine, brain_voxels.min(0), brain_voxels.max(0)


def _random_rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """Rotation matrix with each Euler angle uniform in +-max_degrees."""
    ax, ay, az = np.deg2rad(rng.uniform(-max_degrees, max_degrees, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _resample(maps: torch.Tensor, matrix: np.ndarray, offset: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Trilinear resampling of (1, C, X, Y, Z) maps to ``shape``: output voxel v reads input voxel
    ``matrix @ v + offset``, zero outside (torch's grid_sample is several times faster than scipy here)."""
    in_half = (np.array(maps.shape[2:]) - 1) / 2
    out_half = (np.array(shape) - 1) / 2
    # Same map in grid_sample's normalised [-1, 1] coordinates, whose axes run in reverse order.
    linear = (matrix * out_half) / in_half[:, None]
    shift = (matrix @ out_half + offset - in_half) / in_half
    theta = np.concatenate([linear[::-1, ::-1], shift[::-1, None]], axis=1)
    theta = torch.as_tensor(theta.copy(), dtype=torch.float32)[None]
    grid = torch.nn.functional.affine_grid(theta, [1, maps.shape[1], *shape], align_corners=True)
    return torch.nn.functional.grid_sample(maps, grid, align_corners=True)[0].numpy()


def _sample_anatomy(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Brain mask on the output grid and the (CSF, GM, WM) fractions of its voxels, shape (3, n):
    the MNI brain shrunk to a child's size, slightly rotated and shifted, centred in the field of view."""
    maps, mni_affine, lo_mni, hi_mni = _mni_maps()
    out_affine = grid_affine(shape)
    scale = rng.uniform(0.84, 0.96) * rng.uniform(0.97, 1.03, 3)
    brain_to_mni = np.linalg.inv(_random_rotation(rng, 6.0) @ np.diag(scale))
    shift_mm = rng.uniform(-5, 5, 3)

    mni_centre = mni_affine[:3, :3] @ ((lo_mni + hi_mni) / 2) + mni_affine[:3, 3]
    out_centre = out_affine[:3, :3] @ ((np.array(shape) - 1) / 2) + out_affine[:3, 3]
    # output voxel v -> MNI voxel: mni_inv(mni_centre + brain_to_mni(out_affine v - out_centre - shift))
    mni_inv = np.linalg.inv(mni_affine)
    matrix = mni_inv[:3, :3] @ brain_to_mni @ out_affine[:3, :3]
    offset = (
        mni_inv[:3, :3] @ (mni_centre + brain_to_mni @ (out_affine[:3, 3] - out_centre - shift_mm)) + mni_inv[:3, 3]
    )

    # Resample only the output box that the MNI brain's bounding box lands in.
    corners = np.array([np.where(bits, hi_mni, lo_mni) for bits in np.ndindex(2, 2, 2)])
    corners_out = np.linalg.solve(matrix, (corners - offset).T).T
    box_lo = np.clip(np.floor(corners_out.min(0)).astype(int) - 1, 0, shape)
    box_hi = np.clip(np.ceil(corners_out.max(0)).astype(int) + 2, 0, shape)
    box = tuple(slice(a, b) for a, b in zip(box_lo, box_hi, strict=True))
    mask, gm, wm = _resample(maps, matrix, offset + matrix @ box_lo, tuple(box_hi - box_lo))

    brain = np.zeros(shape, dtype=bool)
    brain[box] = mask > 0.5
    in_brain = brain[box]
    gm, wm = np.clip(gm[in_brain], 0, 1), np.clip(wm[in_brain], 0, 1)
    excess = np.maximum(gm + wm, 1.0)
    gm, wm = gm / excess, wm / excess
    return brain, np.stack([1 - gm - wm, gm, wm])


def _smooth_noise(shape: tuple[int, ...], sigma_vox: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean unit-variance Gaussian random field with correlation length ``sigma_vox``; drawn on a
    coarser grid and upsampled, which keeps wide kernels cheap."""
    factor = np.maximum(1, np.floor(np.asarray(sigma_vox) / 2)).astype(int)
    coarse_shape = tuple(int(n) for n in np.ceil(np.array(shape) / factor))
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape, dtype=np.float32), sigma_vox / factor)
    field = ndimage.zoom(coarse, np.array(shape) / np.array(coarse_shape), order=1, grid_mode=True, mode="nearest")
    return (field - field.mean()) / (field.std() + 1e-6)


def _tumour_centre(brain: np.ndarray, spacing: np.ndarray, radius_mm: float, rng: np.random.Generator) -> np.ndarray:
    """A random brain voxel at least ~0.6 radius from the brain surface (or the deepest available)."""
    stride = max(1, round(4.0 / spacing.min()))
    coarse = brain[::stride, ::stride, ::stride]
    depth = ndimage.distance_transform_edt(coarse, sampling=spacing * stride)
    candidates = np.argwhere(depth >= min(0.6 * radius_mm, 0.8 * depth.max()))
    return candidates[rng.integers(len(candidates))] * stride


def _tumour_labels(
    brain: np.ndarray, spacing: np.ndarray, radius_mm: float, with_et: bool, rng: np.random.Generator
) -> tuple[tuple[slice, ...], np.ndarray]:
    """One tumour in a box of the grid: a 2023 label patch with an irregular edema shell around a core
    whose enhancing part is a broken rim or scattered blobs."""
    centre = _tumour_centre(brain, spacing, radius_mm, rng)
    half = np.ceil(1.6 * radius_mm / spacing).astype(int) + 1
    lo, hi = np.maximum(centre - half, 0), np.minimum(centre + half + 1, brain.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    box_shape = tuple(hi - lo)

    axes_mm = np.ogrid[tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, centre, strict=True))]
    axes_mm = [axis * s for axis, s in zip(axes_mm, spacing, strict=True)]
    rotation = _random_rotation(rng, 90.0)
    elongation = rng.uniform(0.7, 1.3, 3)
    radius = np.sqrt(sum((sum(rotation[i, j] * axes_mm[j] for j in range(3)) / elongation[i]) ** 2 for i in range(3)))
    radius /= radius_mm

    sigma_vox = rng.uniform(0.15, 0.3) * radius_mm / spacing
    whole = radius + rng.uniform(0.2, 0.35) * _smooth_noise(box_shape, sigma_vox, rng) < 1
    core_field = radius / rng.uniform(0.4, 0.75) + rng.uniform(0.1, 0.25) * _smooth_noise(box_shape, sigma_vox, rng)
    inside = brain[box]
    core = (core_field < 1) & inside
    if not core.any():
        core[tuple(centre - lo)] = True
    whole = (whole | ndimage.binary_dilation(core)) & inside

    et = np.zeros_like(core)
    if with_et:
        texture = _smooth_noise(box_shape, sigma_vox / 2, rng)
        if rng.random() < 0.6:
            et = core & (core_field > 1 - rng.uniform(0.2, 0.4)) & (texture > rng.uniform(-1.0, 0.0))
        else:
            et = core & (texture > rng.uniform(0.3, 1.0))
        if not et.any():
            et = core & ~ndimage.binary_erosion(core)
    labels = np.where(et, 3, np.where(core, 1, np.where(whole, 2, 0))).astype(np.uint8)
    return box, labels


def _sample_tumours(
    brain: np.ndarray, spacing: np.ndarray, with_et: bool | None, rng: np.random.Generator
) -> np.ndarray:
    """Label map with 1-3 tumours: one large and up to two small satellites."""
    if with_et is None:
        with_et = rng.random() >= NO_ET_FRACTION
    seg = np.zeros(brain.shape, dtype=np.uint8)
    num_tumours = rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15])
    for index in range(num_tumours):
        radius_mm = rng.uniform(18, 35) if index == 0 else rng.uniform(8, 16)
        tumour_et = with_et and (index == 0 or rng.random() < 0.5)
        box, labels = _tumour_labels(brain, spacing, radius_mm, tumour_et, rng)
        # Keep the more specific label where tumours overlap.
        seg[box] = np.where(LABEL_PRIORITY[labels] > LABEL_PRIORITY[seg[box]], labels, seg[box])
    return seg


def _tumour_mixture(
    seg: np.ndarray, brain: np.ndarray, spacing: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brain-voxel positions around the tumours, their soft (NCR, edema, ET) weights (3, m) and a
    shared texture (m,): soft weights give a partial-volume border, the texture heterogeneity."""
    tumour_voxels = np.argwhere(seg > 0)
    lo = np.maximum(tumour_voxels.min(0) - 3, 0)
    hi = np.minimum(tumour_voxels.max(0) + 4, seg.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    in_brain = brain[box]
    positions = (np.cumsum(brain, axis=None).reshape(brain.shape)[box] - 1)[in_brain]
    weights = np.stack(
        [
            ndimage.gaussian_filter((seg[box] == label).astype(np.float32), 0.7 / spacing)[in_brain]
            for label in TUMOUR_LABELS.values()
        ]
    )
    texture = 1 + 0.08 * _smooth_noise(tuple(hi - lo), 2.0 / spacing, rng)[in_brain]
    return positions, weights, texture


def _bias_field(coords: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field (about +-20%): exp of a random quadratic in coordinates scaled to [-1, 1]."""
    x, y, z = coords
    terms = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
    coefficients = rng.normal(0, 0.08, len(terms)).astype(np.float32)
    return np.exp(sum(c * term for c, term in zip(coefficients, terms, strict=True)))


def _render(
    modality: str,
    brain: np.ndarray,
    tissues: np.ndarray,
    coords: np.ndarray,
    tumour: tuple[np.ndarray, np.ndarray, np.ndarray],
    rng: np.random.Generator,
) -> np.ndarray:
    """One modality: tissue and tumour contrasts, bias field, Rician noise, global scale; 0 outside the brain."""
    means = {name: np.float32(value * rng.uniform(0.92, 1.08)) for name, value in CONTRASTS[modality].items()}
    values = np.array([means["csf"], means["gm"], means["wm"]]) @ tissues
    positions, weights, texture = tumour
    tumour_means = np.array([means[name] for name in TUMOUR_LABELS])
    values[positions] = (1 - weights.sum(0)) * values[positions] + (tumour_means @ weights) * texture

    values *= _bias_field(coords, rng) * np.float32(np.exp(rng.uniform(np.log(300), np.log(3000))))
    sigma = np.float32(rng.uniform(0.015, 0.04) * values.mean())
    real = values + sigma * rng.standard_normal(len(values), dtype=np.float32)
    imaginary = sigma * rng.standard_normal(len(values), dtype=np.float32)
    out = np.zeros(brain.shape, dtype=np.float32)
    # A Rician magnitude is almost never exactly 0; the floor keeps "nonzero" == "brain" exact.
    out[brain] = np.maximum(np.hypot(real, imaginary), np.float32(1e-3))
    return out


def make_case(
    rng_or_seed: np.random.Generator | int, shape: tuple[int, int, int] = BRATS_SHAPE, with_et: bool | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """One synthetic case: ({modality: float32 volume}, uint8 2023 label map, affine).

    ``with_et`` None draws whether the case has enhancing tumour (absent in ~12% of cases).
    """
    rng = np.random.default_rng(rng_or_seed)
    shape = tuple(int(n) for n in shape)
    spacing = np.array(BRATS_SHAPE) / np.array(shape)
    brain, tissues = _sample_anatomy(shape, rng)
    seg = _sample_tumours(brain, spacing, with_et, rng)
    tumour = _tumour_mixture(seg, brain, spacing, rng)
    coords = (np.argwhere(brain) / (np.array(shape) - 1) * 2 - 1).T.astype(np.float32)
    images = {modality: _render(modality, brain, tissues, coords, tumour, rng) for modality in MODALITIES}
    return images, seg, grid_affine(shape)


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI with qform and sform both set, as in BraTS files."""
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=XFORM_CODE)
    image.set_sform(affine, code=XFORM_CODE)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, path)


def write_case(
    case_dir: str | Path,
    case_id: str,
    images: dict[str, np.ndarray],
    seg: np.ndarray | None,
    affine: np.ndarray,
) -> list[Path]:
    """Write ``<case_dir>/<case_id>-{t1c,t1n,t2f,t2w}[,-seg].nii.gz``; returns the paths written."""
    case_dir = Path(case_dir)
    case_dir.mkdir(parents=True, exist_ok=True)
    volumes = {modality: images[modality].astype(np.float32) for modality in MODALITIES}
    if seg is not None:
        volumes["seg"] = seg.astype(np.uint8)
    paths = []
    for key, data in volumes.items():
        paths.append(case_dir / case_file_name(case_id, key))
        _save(data, affine, paths[-1])
    return paths


def _case_ids(count: int, rng: np.random.Generator) -> list[str]:
    """Distinct, non-contiguous BraTS-PED case ids."""
    numbers = rng.choice(np.arange(1, max(500, 10 * count)), size=count, replace=False)
    return [f"BraTS-PED-{n:05d}-000" for n in numbers]


def generate_dataset(
    output_dir: str | Path,
    num_train: int,
    num_val: int,
    seed: int = 0,
    shape: tuple[int, int, int] = BRATS_SHAPE,
    overwrite: bool = False,
) -> dict:
    """Write a training folder (with seg) and a validation folder (without) in the BraTS-PED 2023 layout.

    Returns {"training_dir", "validation_dir", "training", "validation"} (folders and sorted case ids).
    Refuses to replace an existing case folder unless ``overwrite``.
    """
    output_dir = Path(output_dir)
    id_seed, *case_seeds = np.random.SeedSequence(seed).spawn(1 + num_train + num_val)
    ids = _case_ids(num_train + num_val, np.random.default_rng(id_seed))
    train_ids, val_ids = sorted(ids[:num_train]), sorted(ids[num_train:])
    case_dirs = [output_dir / TRAINING_FOLDER / case_id for case_id in train_ids]
    case_dirs += [output_dir / VALIDATION_FOLDER / case_id for case_id in val_ids]
    existing = [str(path) for path in case_dirs if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"case folder(s) already exist: {', '.join(existing)}; pass overwrite=True to replace")

    for index, (case_dir, case_seed) in enumerate(zip(case_dirs, case_seeds, strict=True)):
        images, seg, affine = make_case(np.random.default_rng(case_seed), shape)
        if case_dir.exists():
            shutil.rmtree(case_dir)
        write_case(case_dir, case_dir.name, images, seg if index < num_train else None, affine)
    return {
        "training_dir": str(output_dir / TRAINING_FOLDER),
        "validation_dir": str(output_dir / VALIDATION_FOLDER),
        "training": train_ids,
        "validation": val_ids,
    }


def _parse_shape(shape: str | tuple | list) -> tuple[int, int, int]:
    """Grid shape from the command line: "96,96,64", "96x96x64" or a tuple."""
    if isinstance(shape, str):
        shape = shape.replace("x", ",").split(",")
    parsed = tuple(int(n) for n in shape)
    if len(parsed) != 3 or min(parsed) < 8:
        raise ValueError(f"shape must be three sizes >= 8, e.g. 240,240,155; got {shape!r}")
    return parsed


def main(
    output_dir: str,
    num_train: int = 24,
    num_val: int = 4,
    seed: int = 0,
    shape: str | tuple = BRATS_SHAPE,
    overwrite: bool = False,
) -> None:
    """Write synthetic BraTS-PED 2023 training and validation cases under OUTPUT_DIR."""
    try:
        written = generate_dataset(output_dir, num_train, num_val, seed, _parse_shape(shape), overwrite)
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    for key in ("training", "validation"):
        print(f"{len(written[key])} {key} cases in {written[key + '_dir']}")
        for case_id in written[key]:
            print(f"  {case_id}")


if __name__ == "__main__":
    fire.Fire(main)
