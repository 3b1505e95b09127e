"""The BraTS case layout: where case folders are, what their files are called, and which cases can be used.

A case folder ``<case>`` holds ``<case>-t1c``, ``-t1n``, ``-t2f``, ``-t2w`` and, for training data, ``-seg``
volumes (``.nii.gz`` or ``.nii``); the 2023 challenge and the 2024+ BraTS-PEDs releases share it and differ in
their folder names (``...-TrainingData``, ``Training``, ``BraTS2024-PEDs-Training``...) and label schemes.
A case may also be one stacked file ``<case>.nii.gz`` holding the four modalities as channels in that order
(``scripts.stack_modalities``; MONAI Label serves one image per case): ``stacked_case`` gives its ``image`` list,
that one path, and marks it ``stacked`` for the checks.
``check_case`` lists what makes a case unusable before any work starts; ``LoadCaseImaged`` refuses the same bad
voxels where a config loads the data.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Hashable, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.config import KeysCollection
from monai.data import ImageReader
from monai.transforms import LoadImaged
from monai.utils import convert_to_numpy, ensure_tuple

from scripts.errors import InputError
from scripts.labels import DEFAULT_SCHEME, SCHEMES, LabelScheme, get_scheme

MODALITIES = ("t1c", "t1n", "t2f", "t2w")
LABEL_KEY = "seg"
TRAINING_FOLDER = "ASNR-MICCAI-BraTS2023-PED-Challenge-TrainingData"
VALIDATION_FOLDER = "ASNR-MICCAI-BraTS2023-PED-Challenge-ValidationData"
NIFTI_SUFFIXES = (".nii.gz", ".nii")
PEDIATRIC_COHORT = "PED"
AFFINE_TOLERANCE = 1e-4
# BraTS 2018-2021 file suffixes and the 2023 name each became.
OLD_KEYS = {"t1ce": "t1c", "t1": "t1n", "flair": "t2f", "t2": "t2w", "seg": "seg"}

_KEYS = (*MODALITIES, LABEL_KEY)
_NIFTI_NAME = re.compile(r"\.nii(\.gz)?$")
_CASE_FILE_NAME = re.compile(rf"^(?P<case>.+)-(?:{'|'.join(_KEYS)})\.nii(\.gz)?$")
_OLD_FILE_NAME = re.compile(rf"_(?:{'|'.join(OLD_KEYS)})\.nii(\.gz)?$")
_BRATS_CASE_ID = re.compile(r"^BraTS-(?P<cohort>[A-Za-z]+(?:-[A-Za-z]+)*)-\d+-\d+$")
_SHOWN_VALUES = 5


def case_file_name(case_id: str, key: str, suffix: str = ".nii.gz") -> str:
    """File name of one volume of a case, e.g. ``BraTS-PED-00002-000-t1c.nii.gz``."""
    return f"{case_id}-{key}{suffix}"


def _case_file(case_dir: Path, key: str) -> Path:
    """The ``key`` volume of a case folder: its ``.nii.gz`` or ``.nii`` file, whichever exists (else the first)."""
    candidates = [case_dir / case_file_name(case_dir.name, key, suffix) for suffix in NIFTI_SUFFIXES]
    return next((path for path in candidates if path.is_file()), candidates[0])


def _is_case_dir(path: Path) -> bool:
    """A case folder ``X`` holds at least one ``X-<modality or seg>.nii.gz`` (or ``.nii``)."""
    return path.is_dir() and any(_case_file(path, key).is_file() for key in _KEYS)


def _visible_subfolders(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))


def _nifti_names(folder: Path) -> list[str]:
    return sorted(
        path.name
        for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and _NIFTI_NAME.search(path.name)
    )


def _why_not_a_case(folder: Path) -> str:
    """Why a folder found where case folders are looked for is not one, in words a user can act on."""
    names = _nifti_names(folder)
    if not names:
        deeper = " (case folders are looked for in the dataset folder and one level down)"
        return "no NIfTI files (.nii.gz or .nii)" + (deeper if _visible_subfolders(folder) else "")
    old = [name for name in names if _OLD_FILE_NAME.search(name)]
    if old:
        renames = ", ".join(f"{before} -> {after}" for before, after in OLD_KEYS.items() if before != after)
        return (
            f"files have BraTS 2018-2021 names (e.g. {old[0]}); BraTS 2023 names are expected: "
            f"{folder.name}-{{t1c,t1n,t2f,t2w,seg}}.nii.gz ({renames})"
        )
    others = sorted({match["case"] for name in names if (match := _CASE_FILE_NAME.match(name))})
    if others:
        example = next(name for name in names if _CASE_FILE_NAME.match(name))
        return (
            f"files are named for case {', '.join(others)} (e.g. {example}), not for the folder {folder.name}: "
            "a case folder and its files carry the same case id"
        )
    return (
        f"no {case_file_name(folder.name, 't1c')} (or -t1n, -t2f, -t2w, -seg; .nii.gz or .nii); "
        f"NIfTI files here: {', '.join(names[:3])}" + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    )


def survey_folders(dataset_dir: str | Path) -> tuple[list[Path], list[str]]:
    """(case folders, one "folder: path: reason" line per other folder), looking in ``dataset_dir`` and one level
    down (inside the challenge folders); folders that only hold others and hidden folders are not reported."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise InputError(f"dataset folder not found: {root}")
    case_dirs, problems = [], []
    for child in _visible_subfolders(root):
        grandchildren = _visible_subfolders(child)
        for folder in (child, *grandchildren):
            if _is_case_dir(folder):
                case_dirs.append(folder)
            elif not (folder is child and grandchildren and not _nifti_names(child)):
                problems.append(f"{folder.name}: {folder}: {_why_not_a_case(folder)}")
    return sorted(case_dirs), problems


def find_case_dirs(dataset_dir: str | Path) -> list[Path]:
    """Case folders directly in ``dataset_dir`` or one level down (inside the challenge folders), sorted."""
    return survey_folders(dataset_dir)[0]


def case_files(case_dir: str | Path) -> dict:
    """Expected files of a case: {"case": id, "image": [t1c, t1n, t2f, t2w paths], "label": seg path or None}."""
    case_dir = Path(case_dir).absolute()
    label = _case_file(case_dir, LABEL_KEY)
    return {
        "case": case_dir.name,
        "image": [str(_case_file(case_dir, modality)) for modality in MODALITIES],
        "label": str(label) if label.is_file() else None,
    }


def stacked_case(path: str | Path) -> dict:
    """A case stored as one 4-channel file (``<case>.nii.gz``), in the form of ``case_files``, marked ``stacked``."""
    path = Path(path).absolute()
    return {"case": _NIFTI_NAME.sub("", path.name), "image": [str(path)], "label": None, "stacked": True}


def stacked_case_files(folder: str | Path) -> list[Path]:
    """The NIfTI files directly in `folder` (stacked cases), sorted; hidden files and temporaries are left out."""
    return [Path(folder) / name for name in _nifti_names(Path(folder))]


def case_id_from_path(image_path: str | Path) -> str:
    """Case id from a volume's file name, e.g. ``BraTS-PED-00002-000-t1c.nii.gz`` -> ``BraTS-PED-00002-000``."""
    match = _CASE_FILE_NAME.match(Path(image_path).name)
    return match["case"] if match else Path(image_path).parent.name


def cohort_problem(case_id: str) -> str | None:
    """Why a BraTS case of another cohort (GLI, MEN, MET, SSA...) is not pediatric data, or None."""
    match = _BRATS_CASE_ID.match(case_id)
    if match and match["cohort"].upper() != PEDIATRIC_COHORT:
        return f"case from the BraTS {match['cohort']} cohort, not pediatric ({PEDIATRIC_COHORT}): left out"
    return None


def _listed(values: list) -> str:
    """A value list for a message, cut after a few values."""
    more = len(values) - _SHOWN_VALUES
    shown = ", ".join(f"{value:g}" for value in values[:_SHOWN_VALUES])
    return f"[{shown}]" + (f" and {more} more" if more > 0 else "")


def label_counts(data: np.ndarray) -> dict[int, int]:
    """{value: number of voxels} of a label volume of whole numbers, for the values present; counting is much
    faster than sorting for small ones."""
    if data.size and data.min() >= 0 and data.max() < 2**16:
        counts = np.bincount(data.ravel(order="K").astype(np.intp, copy=False))
        return {int(value): int(counts[value]) for value in np.flatnonzero(counts)}
    values, counts = np.unique(data, return_counts=True)
    return {int(value): int(count) for value, count in zip(values, counts, strict=True)}


def label_values(data: np.ndarray) -> set[int]:
    """Distinct values of a label volume of whole numbers."""
    return set(label_counts(data))


def schemes_fitting(values: set[int]) -> list[str]:
    """Names of the label schemes whose values include all of `values`."""
    return [name for name, scheme in SCHEMES.items() if values <= scheme.values]


def _fraction_problem(data: np.ndarray) -> str | None:
    """Why a segmentation's voxel values are not whole numbers, or None."""
    if data.dtype.kind in "fc":
        whole = np.isfinite(data) & (data == np.round(data))
        if not whole.all():
            return f"non-integer label values {_listed(np.unique(data[~whole]).tolist())}"
    return None


def label_scheme_problem(values: set[int], label_scheme: str | LabelScheme = DEFAULT_SCHEME) -> str | None:
    """Why a segmentation with these distinct values is not labelled in `label_scheme`, or None; names the
    schemes the values do fit, since a dataset of another release is the usual cause."""
    scheme = get_scheme(label_scheme)
    unexpected = sorted(values - scheme.values)
    if not unexpected:
        return None
    problem = f"label values {_listed(unexpected)} outside {sorted(scheme.values)} ({scheme.name}: {scheme.title})"
    fitting = schemes_fitting(values)
    if fitting:
        problem += f"; they fit --label_scheme {' or '.join(fitting)}"
    return problem


def volume_problem(data: np.ndarray, label: bool = False, scheme: str | LabelScheme = DEFAULT_SCHEME) -> str | None:
    """Why a volume must not reach a model, or None: an image with non-finite voxels or nothing but zeros,
    or a segmentation whose values are not whole-number labels of the label scheme."""
    if label:
        return _fraction_problem(data) or label_scheme_problem(label_values(data), scheme)
    if data.dtype.kind in "fc":
        non_finite = data.size - int(np.count_nonzero(np.isfinite(data)))
        if non_finite:
            return f"{non_finite} non-finite voxels (NaN/Inf)"
    if not data.any():
        return "all voxels are zero (empty volume)"
    return None


def _stored_size_matches(path: str, image: nib.Nifti1Image) -> bool:
    """Whether the file holds as many bytes as the header announces, without decompressing: a gzip
    member ends with its uncompressed size mod 2**32, which a truncated download lacks."""
    proxy = image.dataobj  # nibabel zeroes the in-memory vox_offset; the proxy keeps the real one
    expected = int(proxy.offset) + int(np.prod(proxy.shape)) * np.dtype(proxy.dtype).itemsize
    if not path.endswith(".gz"):
        return os.path.getsize(path) >= expected
    with open(path, "rb") as file:
        file.seek(-4, os.SEEK_END)
        return int.from_bytes(file.read(4), "little") == expected % 2**32


def _other_suffix(path: str) -> str | None:
    """The same volume's path with the other NIfTI suffix (``.nii.gz`` <-> ``.nii``), or None."""
    if path.endswith(".nii.gz"):
        return path[: -len(".gz")]
    return path + ".gz" if path.endswith(".nii") else None


def _open_volume(path: str, stacked: bool = False) -> tuple[nib.Nifti1Image | None, str | None]:
    """(image with its header read, None) or (None, why it cannot be used); a `stacked` image holds the four
    modalities along its fourth axis, any other is 3D."""
    if not Path(path).is_file():
        return None, "missing"
    twin = _other_suffix(path)
    if twin and Path(twin).is_file():
        return None, f"both {Path(path).name} and {Path(twin).name} exist: keep one"
    try:
        image = nib.load(path)
        if stacked and (len(image.shape) != 4 or image.shape[3] != len(MODALITIES)):
            return None, (
                f"expected one volume of {len(MODALITIES)} channels ({', '.join(MODALITIES)}) along the fourth axis, "
                f"got shape {image.shape}"
            )
        if not stacked and len(image.shape) != 3:
            return None, f"expected a 3D volume, got shape {image.shape}"
        if not _stored_size_matches(path, image):
            # Multi-member gzip files also fail the cheap test: only a full read decides. The voxels are kept,
            # so that the data checks do not read the file again.
            image = nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine, image.header)
    except Exception as error:
        return None, f"unreadable ({type(error).__name__}: {error})"
    return image, None


def _grid_problem(image: nib.Nifti1Image, reference_name: str, reference: nib.Nifti1Image) -> str | None:
    """Why a volume is not on the grid of the case's first readable volume, or None."""
    if image.shape[:3] != reference.shape[:3]:
        return f"shape {image.shape[:3]} differs from {reference_name} {reference.shape[:3]}"
    if not np.allclose(image.affine, reference.affine, atol=AFFINE_TOLERANCE):
        difference = np.abs(image.affine - reference.affine).max()
        return f"affine differs from {reference_name} (max difference {difference:.3g})"
    return None


def channel_problems(data: np.ndarray) -> list[str]:
    """``volume_problem`` of each modality of a stacked image (modalities along the last axis), naming the channel."""
    named = [
        f"channel {index}" + (f" ({MODALITIES[index]})" if index < len(MODALITIES) else "")
        for index in range(data.shape[-1])
    ]
    problems = [volume_problem(data[..., index]) for index in range(data.shape[-1])]
    return [f"{name}: {problem}" for name, problem in zip(named, problems, strict=True) if problem]


def _read_voxels(image: nib.Nifti1Image, label: bool) -> tuple[str | None, dict[int, int] | None]:
    """(problem, None) or (None, a segmentation's voxels per value; None for an image) from a file's voxels, read
    once: non-finite or all-zero images (each channel of a stacked one) and fractional labels are problems, and so
    is a file that ends early."""
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as error:
        return f"unreadable ({type(error).__name__}: {error})", None
    if not label:
        return ("; ".join(channel_problems(data)) or None) if data.ndim == 4 else volume_problem(data), None
    problem = _fraction_problem(data)
    return problem, None if problem else label_counts(data)


def survey_case(
    case: dict, check_labels: bool = True, check_data: bool = True
) -> tuple[list[str], dict[int, int] | None]:
    """(problems of a case from ``case_files`` or ``stacked_case``, each "case: file: reason", the voxels per value
    of its segmentation, ``label_counts``, or None when there is none or it was not read), all but the label scheme's
    check: a dataset's scheme may be told from the values of all its cases, so each file is read once, before it is
    known (and the counts serve for stratified folds).

    Headers give presence, shape, affine and completeness cheaply; ``check_data`` also reads every volume once
    for non-finite or all-zero images and, with ``check_labels``, whole-number label values.
    """
    reference: tuple[str, nib.Nifti1Image] | None = None
    problems, values = [], None
    stacked = bool(case.get("stacked"))
    for path in [*case["image"], *([case["label"]] if case["label"] else [])]:
        is_label = path == case["label"]
        image, problem = _open_volume(path, stacked=stacked and not is_label)
        if image is not None and reference is None:
            reference = (Path(path).name, image)
        elif image is not None:
            problem = _grid_problem(image, *reference)
        if image is not None and problem is None and check_data and (check_labels or not is_label):
            problem, found = _read_voxels(image, is_label)
            if is_label:
                values = found
        if problem:
            problems.append(f"{case['case']}: {path}: {problem}")
    return problems, values


def scheme_problems(case: dict, values: Collection[int] | None, label_scheme: str | LabelScheme) -> list[str]:
    """The "case: seg file: reason" line of a case whose segmentation values (from ``survey_case``) fall outside
    `label_scheme`, or nothing."""
    problem = None if values is None else label_scheme_problem(set(values), label_scheme)
    return [f"{case['case']}: {case['label']}: {problem}"] if problem else []


def check_case(
    case: dict, check_labels: bool = True, check_data: bool = True, label_scheme: str | LabelScheme = DEFAULT_SCHEME
) -> list[str]:
    """Problems of a case from ``case_files``, each "case: file: reason"; empty when the case is usable.

    ``survey_case``'s checks, and with ``check_data`` and ``check_labels`` label values of `label_scheme`.
    """
    problems, values = survey_case(case, check_labels, check_data)
    return problems + scheme_problems(case, values, label_scheme)


class LoadCaseImaged(LoadImaged):
    """LoadImaged that then refuses volumes no model should see (``volume_problem``, labels of `label_scheme`),
    raising an InputError with one "case: file: reason" line per bad file; channel i of a key comes from the i-th
    path given for it."""

    def __init__(
        self,
        *args: Any,
        label_keys: KeysCollection = ("label",),
        label_scheme: str | LabelScheme = DEFAULT_SCHEME,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.label_keys = ensure_tuple(label_keys)
        self.label_scheme = get_scheme(label_scheme)

    def __call__(self, data: Mapping[Hashable, Any], reader: ImageReader | None = None) -> dict[Hashable, Any]:
        loaded = super().__call__(data, reader)
        problems = []
        for key in self.key_iterator(loaded):
            paths = [str(path) for path in ensure_tuple(data[key])]
            array = convert_to_numpy(loaded[key])
            if len(paths) == 1 and key not in self.label_keys and array.ndim == 4:
                # One stacked file: each channel is a modality.
                channels_last = np.moveaxis(array, 0, -1) if self._loader.ensure_channel_first else array
                case = stacked_case(paths[0])["case"]
                problems += [f"{case}: {paths[0]}: {problem}" for problem in channel_problems(channels_last)]
                continue
            volumes = [(paths[0], array)] if len(paths) == 1 else zip(paths, array, strict=True)
            for path, volume in volumes:
                problem = volume_problem(volume, key in self.label_keys, self.label_scheme)
                if problem:
                    problems.append(f"{case_id_from_path(path)}: {path}: {problem}")
        if problems:
            raise InputError(problems)
        return loaded
