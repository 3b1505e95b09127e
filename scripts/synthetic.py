"""Synthetic BraTS-PED cases: MNI152 anatomy with irregular tumours, in the 2023 challenge layout.

Cases carry the BraTS geometry (240x240x155, 1 mm, LPS qform), naming and the labels of a label scheme (the 2023
ones by default; brats2024_ped adds fluid-filled cysts), so the data pipeline, training and evaluation can be
exercised end to end without the real data. A smaller ``shape`` keeps the same field of view with coarser voxels,
for fast tests.
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
from scripts.labels import DEFAULT_SCHEME, LabelScheme, get_scheme

BRATS_SHAPE = (240, 240, 155)
BRATS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]])
# ITK (and so the BraTS preprocessing) writes both transforms with code 1, scanner anatomical.
XFORM_CODE = 1
# 88 of 99 BraTS-PED 2023 training cases have enhancing tumour, and fewer of the 2024 ones (diffuse midline gliomas
# often do not enhance); a fifth without gives most cross-validation folds of a small demo set an ET-free case.
NO_ET_FRACTION = 0.2
# How a tumour's enhancing part looks, with its probability: paediatric ET is mostly small, thin or scattered, which
# is what makes it the hardest region to learn. A rim is a thin broken shell at the core's surface, foci are a few
# nodules of a few mm, patches are small irregular spots and a mass is a larger enhancing part of the core.
ET_KINDS = {"rim": 0.35, "foci": 0.3, "patches": 0.2, "mass": 0.15}
RIM_MM = (1.5, 3.5)  # thickness of an enhancing rim
FOCUS_RADIUS_MM = (1.5, 4.0)
SATELLITE_ET_FRACTION = 0.6  # satellite tumours that enhance too, in a case with ET: several ET lesions
CYST_FRACTION = 0.5  # tumours with a cyst, in schemes that label cysts (pilocytic astrocytomas often have one)

# Mean intensity of each tissue and tumour sub-region per modality, before the per-case scale; a (low, high)
# range is drawn per case instead. A cyst is fluid: dark on T1, bright on T2, and on FLAIR as bright as its
# protein content makes it.
CONTRASTS = {
    "t1c": {"csf": 0.32, "gm": 0.72, "wm": 0.90, "edema": 0.62, "core": 0.48, "et": 1.45, "cyst": 0.30},
    "t1n": {"csf": 0.30, "gm": 0.70, "wm": 0.90, "edema": 0.62, "core": 0.45, "et": 0.65, "cyst": 0.28},
    "t2f": {"csf": 0.12, "gm": 0.62, "wm": 0.50, "edema": 0.95, "core": 0.70, "et": 0.80, "cyst": (0.40, 0.95)},
    "t2w": {"csf": 1.00, "gm": 0.62, "wm": 0.45, "edema": 0.88, "core": 0.95, "et": 0.70, "cyst": 1.15},
}
# Tumour tissue kinds, coded 1, 2... in this order in a tumour map (0: none); their intensities are mixed in this
# order, which the output of the 2023 scheme depends on, so new kinds go at the end.
TISSUES = ("core", "edema", "et", "cyst")
# Where tumours overlap, the more specific tissue wins: enhancing over cyst over core over edema.
OVERLAP_ORDER = ("edema", "core", "cyst", "et")
# The tissue each label abbreviation of a scheme stands for (2023 and 2018-2021 call the core NCR, 2024 NET and
# label its cysts apart).
TISSUE_OF_LABEL = {"NCR": "core", "NET": "core", "ED": "edema", "ET": "et", "CC": "cyst"}

_CODE = {tissue: code for code, tissue in enumerate(TISSUES, start=1)}
_PRIORITY = np.array([0, *(OVERLAP_ORDER.index(tissue) + 1 for tissue in TISSUES)], dtype=np.uint8)


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


def _cyst(core: np.ndarray, spacing: np.ndarray, radius_mm: float, rng: np.random.Generator) -> np.ndarray:
    """A round cyst in a tumour core, around a random voxel of its interior and kept off the core's surface, so
    that tumour tissue walls it in (empty where the core has no interior)."""
    interior = ndimage.binary_erosion(core)
    if not interior.any():
        return interior
    candidates = np.argwhere(interior)
    centre = candidates[rng.integers(len(candidates))]
    cyst_radius_mm = rng.uniform(0.3, 0.6) * radius_mm
    axes_mm = np.ogrid[tuple(slice(-c, n - c) for c, n in zip(centre, core.shape, strict=True))]
    distance = np.sqrt(sum((axis * s) ** 2 for axis, s in zip(axes_mm, spacing, strict=True)))
    return interior & (distance < cyst_radius_mm)


def _enhancing(
    kind: str, solid: np.ndarray, spacing: np.ndarray, sigma_vox: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Enhancing voxels of a tumour's solid core, of one of ``ET_KINDS`` (may be empty); ``sigma_vox`` is the
    correlation length of the tumour's texture."""
    if kind == "foci":
        candidates = np.argwhere(solid)
        centres = candidates[rng.integers(len(candidates), size=rng.integers(2, 7))]
        axes = np.indices(solid.shape, sparse=True)
        foci = np.zeros_like(solid)
        for centre in centres:
            distance = np.sqrt(sum(((axis - c) * s) ** 2 for axis, c, s in zip(axes, centre, spacing, strict=True)))
            foci |= distance <= rng.uniform(*FOCUS_RADIUS_MM)
        return solid & foci
    texture = _smooth_noise(solid.shape, sigma_vox / (3 if kind == "patches" else 2), rng)
    if kind == "rim":
        depth = ndimage.distance_transform_edt(np.pad(solid, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
        return solid & (depth <= rng.uniform(*RIM_MM)) & (texture > rng.uniform(-0.8, 0.3))
    if kind == "patches":
        return solid & (texture > rng.uniform(1.0, 1.6))
    return solid & (texture > rng.uniform(0.0, 0.8))


def _tumour_tissues(
    brain: np.ndarray,
    spacing: np.ndarray,
    radius_mm: float,
    with_et: bool,
    with_cyst: bool,
    rng: np.random.Generator,
) -> tuple[tuple[slice, ...], np.ndarray]:
    """One tumour in a box of the grid: a patch of tissue codes with an irregular edema shell around a core
    with an enhancing part of one of ``ET_KINDS``, and optionally a cyst inside the core."""
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

    # Fluid does not enhance: enhancing tumour lies in the solid part of the core, around any cyst.
    cyst = _cyst(core, spacing, radius_mm, rng) if with_cyst else np.zeros_like(core)
    solid = core & ~cyst
    et = np.zeros_like(core)
    if with_et:
        et = _enhancing(rng.choice(list(ET_KINDS), p=list(ET_KINDS.values())), solid, spacing, sigma_vox, rng)
    if with_et and not et.any():
        et = core & ~ndimage.binary_erosion(core)
    codes = [_CODE["et"], _CODE["cyst"], _CODE["core"], _CODE["edema"]]
    tissues = np.select([et, cyst, core, whole], codes, default=0).astype(np.uint8)
    return box, tissues


def _sample_tumours(
    brain: np.ndarray, spacing: np.ndarray, with_et: bool | None, with_cysts: bool, rng: np.random.Generator
) -> np.ndarray:
    """Tissue-code map with 1-3 tumours: one large and up to two small satellites."""
    if with_et is None:
        with_et = rng.random() >= NO_ET_FRACTION
    tumours = np.zeros(brain.shape, dtype=np.uint8)
    num_tumours = rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15])
    for index in range(num_tumours):
        radius_mm = rng.uniform(18, 35) if index == 0 else rng.uniform(8, 16)
        tumour_et = with_et and (index == 0 or rng.random() < SATELLITE_ET_FRACTION)
        tumour_cyst = with_cysts and rng.random() < CYST_FRACTION
        box, tissues = _tumour_tissues(brain, spacing, radius_mm, tumour_et, tumour_cyst, rng)
        # Keep the more specific tissue where tumours overlap.
        tumours[box] = np.where(_PRIORITY[tissues] > _PRIORITY[tumours[box]], tissues, tumours[box])
    return tumours


def _tumour_mixture(
    tumours: np.ndarray, tissues: tuple[str, ...], brain: np.ndarray, spacing: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brain-voxel positions around the tumours, their soft weights of each of `tissues` (k, m) and a
    shared texture (m,): soft weights give a partial-volume border, the texture heterogeneity."""
    tumour_voxels = np.argwhere(tumours > 0)
    lo = np.maximum(tumour_voxels.min(0) - 3, 0)
    hi = np.minimum(tumour_voxels.max(0) + 4, tumours.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    in_brain = brain[box]
    positions = (np.cumsum(brain, axis=None).reshape(brain.shape)[box] - 1)[in_brain]
    weights = np.stack(
        [
            ndimage.gaussian_filter((tumours[box] == _CODE[tissue]).astype(np.float32), 0.7 / spacing)[in_brain]
            for tissue in tissues
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
    tumour_tissues: tuple[str, ...],
    tumour: tuple[np.ndarray, np.ndarray, np.ndarray],
    rng: np.random.Generator,
) -> np.ndarray:
    """One modality: tissue and tumour contrasts, bias field, Rician noise, global scale; 0 outside the brain."""
    means = {
        name: np.float32(rng.uniform(*value) if isinstance(value, tuple) else value * rng.uniform(0.92, 1.08))
        for name, value in CONTRASTS[modality].items()
        if name in ("csf", "gm", "wm", *tumour_tissues)
    }
    values = np.array([means["csf"], means["gm"], means["wm"]]) @ tissues
    positions, weights, texture = tumour
    tumour_means = np.array([means[name] for name in tumour_tissues])
    values[positions] = (1 - weights.sum(0)) * values[positions] + (tumour_means @ weights) * texture

    values *= _bias_field(coords, rng) * np.float32(np.exp(rng.uniform(np.log(300), np.log(3000))))
    sigma = np.float32(rng.uniform(0.015, 0.04) * values.mean())
    real = values + sigma * rng.standard_normal(len(values), dtype=np.float32)
    imaginary = sigma * rng.standard_normal(len(values), dtype=np.float32)
    out = np.zeros(brain.shape, dtype=np.float32)
    # A Rician magnitude is almost never exactly 0; the floor keeps "nonzero" == "brain" exact.
    out[brain] = np.maximum(np.hypot(real, imaginary), np.float32(1e-3))
    return out


def _tissue_labels(scheme: LabelScheme) -> dict[str, int]:
    """{tumour tissue kind: its label value in `scheme`}, in ``TISSUES`` order."""
    labels = {TISSUE_OF_LABEL[abbreviation]: value for value, (abbreviation, _) in scheme.labels.items()}
    return {tissue: labels[tissue] for tissue in TISSUES if tissue in labels}


def make_case(
    rng_or_seed: np.random.Generator | int,
    shape: tuple[int, int, int] = BRATS_SHAPE,
    with_et: bool | None = None,
    label_scheme: str | LabelScheme = DEFAULT_SCHEME,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """One synthetic case: ({modality: float32 volume}, uint8 label map in `label_scheme`, affine).

    ``with_et`` None draws whether the case has enhancing tumour (absent in ``NO_ET_FRACTION`` of cases). Tumours
    get cysts only where the scheme labels them apart, so the default scheme's cases stay what its seeds always gave.
    """
    tissue_labels = _tissue_labels(get_scheme(label_scheme))
    tumour_tissues = tuple(tissue_labels)
    rng = np.random.default_rng(rng_or_seed)
    shape = tuple(int(n) for n in shape)
    spacing = np.array(BRATS_SHAPE) / np.array(shape)
    brain, tissues = _sample_anatomy(shape, rng)
    tumours = _sample_tumours(brain, spacing, with_et, "cyst" in tissue_labels, rng)
    tumour = _tumour_mixture(tumours, tumour_tissues, brain, spacing, rng)
    coords = (np.argwhere(brain) / (np.array(shape) - 1) * 2 - 1).T.astype(np.float32)
    images = {
        modality: _render(modality, brain, tissues, coords, tumour_tissues, tumour, rng) for modality in MODALITIES
    }
    label_of_code = np.zeros(len(TISSUES) + 1, dtype=np.uint8)
    for tissue, value in tissue_labels.items():
        label_of_code[_CODE[tissue]] = value
    return images, label_of_code[tumours], grid_affine(shape)


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
    label_scheme: str = DEFAULT_SCHEME,
) -> dict:
    """Write a training folder (with seg, labelled in `label_scheme`) and a validation folder (without) in the
    BraTS-PED 2023 layout.

    Returns {"training_dir", "validation_dir", "training", "validation"} (folders and sorted case ids).
    Refuses to replace an existing case folder unless ``overwrite``.
    """
    scheme = get_scheme(label_scheme)
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
        images, seg, affine = make_case(np.random.default_rng(case_seed), shape, label_scheme=scheme)
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
    label_scheme: str = DEFAULT_SCHEME,
) -> None:
    """Write synthetic BraTS-PED training and validation cases under OUTPUT_DIR, in the 2023 layout, labelled in
    --label_scheme (brats2023_ped, brats2024_ped with cysts, or brats2021)."""
    try:
        written = generate_dataset(output_dir, num_train, num_val, seed, _parse_shape(shape), overwrite, label_scheme)
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    for key in ("training", "validation"):
        print(f"{len(written[key])} {key} cases in {written[key + '_dir']}")
        for case_id in written[key]:
            print(f"  {case_id}")


if __name__ == "__main__":
    fire.Fire(main)
