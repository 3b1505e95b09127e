"""Scan a BraTS-PED 2023 dataset, check every case and write a JSON datalist with cross-validation folds.

The datalist is the file the training config reads (``fold_split``): training cases (with seg) carry
a fold number, validation-challenge cases (without seg) are listed under "testing". Paths are stored
relative to the dataset folder so the file survives moving the data.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import fire
import nibabel as nib
import numpy as np

from scripts.atomic import write_text_atomic
from scripts.labels import VALID_LABELS

MODALITIES = ("t1c", "t1n", "t2f", "t2w")
LABEL_KEY = "seg"
TRAINING_FOLDER = "ASNR-MICCAI-BraTS2023-PED-Challenge-TrainingData"
VALIDATION_FOLDER = "ASNR-MICCAI-BraTS2023-PED-Challenge-ValidationData"
AFFINE_TOLERANCE = 1e-4


class DatasetError(ValueError):
    """Cases failed their checks and strict mode refuses to leave them out."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def case_file_name(case_id: str, key: str) -> str:
    """File name of one volume of a case, e.g. ``BraTS-PED-00002-000-t1c.nii.gz``."""
    return f"{case_id}-{key}.nii.gz"


def _is_case_dir(path: Path) -> bool:
    """A case folder ``X`` holds at least one ``X-<modality or seg>.nii.gz``."""
    return path.is_dir() and any((path / case_file_name(path.name, key)).is_file() for key in (*MODALITIES, LABEL_KEY))


def find_case_dirs(dataset_dir: str | Path) -> list[Path]:
    """Case folders directly in ``dataset_dir`` or one level down (inside the challenge folders), sorted."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    children = [path for path in root.iterdir() if path.is_dir()]
    grandchildren = [path for child in children for path in child.iterdir()]
    return sorted(path for path in children + grandchildren if _is_case_dir(path))


def case_files(case_dir: str | Path) -> dict:
    """Expected files of a case: {"case": id, "image": [t1c, t1n, t2f, t2w paths], "label": seg path or None}."""
    case_dir = Path(case_dir).absolute()
    case_id = case_dir.name
    label = case_dir / case_file_name(case_id, LABEL_KEY)
    return {
        "case": case_id,
        "image": [str(case_dir / case_file_name(case_id, modality)) for modality in MODALITIES],
        "label": str(label) if label.is_file() else None,
    }


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


def _open_volume(path: str) -> tuple[nib.Nifti1Image | None, str | None]:
    """(image with its header read, None) or (None, why it cannot be used)."""
    if not Path(path).is_file():
        return None, "missing"
    try:
        image = nib.load(path)
        if len(image.shape) != 3:
            return None, f"expected a 3D volume, got shape {image.shape}"
        if not _stored_size_matches(path, image):
            # Multi-member gzip files also fail the cheap test: only a full read decides.
            np.asanyarray(image.dataobj)
    except Exception as error:
        return None, f"unreadable ({type(error).__name__}: {error})"
    return image, None


def _label_values(data: np.ndarray) -> np.ndarray:
    """Distinct values of a label volume; counting is much faster than sorting for small integers."""
    if data.dtype.kind in "ui" and data.size and data.min() >= 0 and data.max() < 2**16:
        return np.flatnonzero(np.bincount(data.ravel(order="K")))
    return np.unique(data)


def _label_problem(image: nib.Nifti1Image) -> str | None:
    """Why a segmentation's voxel values are not 2023 BraTS labels, or None."""
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as error:
        return f"unreadable ({type(error).__name__}: {error})"
    unexpected = sorted(set(_label_values(data).tolist()) - VALID_LABELS)
    if unexpected:
        return f"label values {unexpected} outside {sorted(VALID_LABELS)} (BraTS 2023 labels)"
    return None


def check_case(case: dict, check_labels: bool = True) -> list[str]:
    """Problems of a case from ``case_files``, each "case: file: reason"; empty when the case is usable.

    Headers give shape and affine cheaply; label data is read only when ``check_labels``.
    """
    reference: tuple[str, nib.Nifti1Image] | None = None
    problems = []
    paths = [*case["image"], *([case["label"]] if case["label"] else [])]
    for path in paths:
        image, problem = _open_volume(path)
        if image is not None and reference is None:
            reference = (Path(path).name, image)
        elif image is not None:
            ref_name, ref_image = reference
            if image.shape != ref_image.shape:
                problem = f"shape {image.shape} differs from {ref_name} {ref_image.shape}"
            elif not np.allclose(image.affine, ref_image.affine, atol=AFFINE_TOLERANCE):
                difference = np.abs(image.affine - ref_image.affine).max()
                problem = f"affine differs from {ref_name} (max difference {difference:.3g})"
        if problem is None and image is not None and check_labels and path == case["label"]:
            problem = _label_problem(image)
        if problem:
            problems.append(f"{case['case']}: {path}: {problem}")
    return problems


def assign_folds(case_ids: list[str], num_folds: int, seed: int) -> dict[str, int]:
    """Balanced folds (sizes differ by at most 1): sorted ids shuffled by ``seed``, dealt round-robin."""
    if not 2 <= num_folds <= len(case_ids):
        raise ValueError(
            f"num_folds must be between 2 and the number of training cases ({len(case_ids)}), got {num_folds}"
        )
    order = np.random.default_rng(seed).permutation(len(case_ids))
    ids = sorted(case_ids)
    return {ids[index]: position % num_folds for position, index in enumerate(order)}


def _in_training_folder(case_dir: Path) -> bool:
    """Cases under a challenge training folder must have a segmentation."""
    return "training" in case_dir.parent.name.lower()


def _scan(root: Path) -> tuple[list[dict], list[str]]:
    """Usable cases (from ``case_files``) and the problem lines of the others."""
    case_dirs = find_case_dirs(root)
    if not case_dirs:
        raise FileNotFoundError(
            f"no case folders under {root}: expected <case>/<case>-t1c.nii.gz etc. in {root} "
            f"or in {root}/{TRAINING_FOLDER} and {root}/{VALIDATION_FOLDER}"
        )
    usable, problems, seen = [], [], {}
    for case_dir in case_dirs:
        case = case_files(case_dir)
        case_problems = check_case(case)
        if case["case"] in seen:
            case_problems.append(f"{case['case']}: {case_dir}: duplicate case id (also in {seen[case['case']]})")
        elif case["label"] is None and _in_training_folder(case_dir):
            missing = case_dir / case_file_name(case["case"], LABEL_KEY)
            case_problems.append(f"{case['case']}: {missing}: missing (cases in the training folder need one)")
        seen.setdefault(case["case"], case_dir)
        if case_problems:
            problems.extend(case_problems)
        else:
            usable.append(case)
    return usable, problems


def make_datalist(
    dataset_dir: str | Path, num_folds: int = 5, seed: int = 0, strict: bool = False
) -> tuple[dict, list[str]]:
    """(datalist with paths relative to ``dataset_dir``, problem lines of the cases left out).

    Each problem line starts with the case id. ``strict`` raises ``DatasetError`` instead of leaving cases out.
    """
    root = Path(dataset_dir).absolute()
    cases, problems = _scan(root)
    if strict and problems:
        raise DatasetError(problems)

    def relative(path: str) -> str:
        return Path(os.path.relpath(path, root)).as_posix()

    training = [case for case in cases if case["label"] is not None]
    folds = assign_folds([case["case"] for case in training], num_folds, seed) if training else {}
    datalist = {
        "training": [
            {
                "image": [relative(p) for p in case["image"]],
                "label": relative(case["label"]),
                "fold": folds[case["case"]],
            }
            for case in training
        ],
        "testing": [{"image": [relative(p) for p in case["image"]]} for case in cases if case["label"] is None],
    }
    return datalist, problems


def write_json_atomic(data: dict, path: str | Path) -> None:
    """Write JSON atomically, so readers never see a partial datalist."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def load_json(path: str | Path) -> dict:
    """A datalist (or other JSON object) read from `path`, with an error naming the file if it is not one."""
    try:
        with open(path) as file:
            content = json.load(file)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"datalist not found: {path} (write one with: python -m scripts.prepare_datalist)"
        ) from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path} should hold a JSON object with 'training' and 'testing' lists")
    return content


def case_id_from_path(image_path: str) -> str:
    """Case id from a volume's file name, e.g. ``BraTS-PED-00002-000-t1c.nii.gz`` -> ``BraTS-PED-00002-000``."""
    name = Path(image_path).name
    for key in (*MODALITIES, LABEL_KEY):
        suffix = f"-{key}.nii.gz"
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(image_path).parent.name


def fold_split(datalist: str | Path | dict, dataset_dir: str | Path, fold: int) -> tuple[list[dict], list[dict]]:
    """(training cases, validation cases) of ``fold``: dicts with absolute "image" and "label" paths and "case"."""
    name = "<datalist dict>" if isinstance(datalist, dict) else str(datalist)
    if not isinstance(datalist, dict):
        datalist = load_json(datalist)
    entries = datalist.get("training", [])
    if any("fold" not in entry for entry in entries):
        raise ValueError(
            f"datalist {name} has training entries without 'fold'; rebuild it with scripts.prepare_datalist"
        )
    folds = sorted({int(entry["fold"]) for entry in entries})
    if fold not in folds:
        raise ValueError(f"fold {fold} is not in datalist {name}; folds present: {folds}")

    def absolute(path: str) -> str:
        return os.path.abspath(os.path.join(dataset_dir, path))

    train, val = [], []
    for entry in entries:
        case = {
            "image": [absolute(p) for p in entry["image"]],
            "label": absolute(entry["label"]),
            "case": case_id_from_path(entry["image"][0]),
        }
        (val if int(entry["fold"]) == fold else train).append(case)
    return train, val


def main(dataset_dir: str, output: str, num_folds: int = 5, seed: int = 0, strict: bool = False) -> None:
    """Check the cases under DATASET_DIR and write the datalist JSON to OUTPUT (bad cases are left out
    and reported on stderr; with --strict any problem stops the script and nothing is written)."""
    try:
        datalist, problems = make_datalist(dataset_dir, num_folds, seed, strict)
    except DatasetError as error:
        for line in error.problems:
            print(line, file=sys.stderr)
        print(f"--strict: {len(error.problems)} problem(s), nothing written to {output}", file=sys.stderr)
        sys.exit(1)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    for line in problems:
        print(line, file=sys.stderr)
    write_json_atomic(datalist, output)

    sizes = np.bincount([entry["fold"] for entry in datalist["training"]], minlength=num_folds)
    left_out = sorted({line.split(": ", 1)[0] for line in problems})
    print(f"wrote {output}")
    print(f"{len(datalist['training'])} training cases in {num_folds} folds (sizes {', '.join(map(str, sizes))})")
    print(f"{len(datalist['testing'])} testing cases")
    print(f"{len(left_out)} left out" + (f" with problems: {', '.join(left_out)}" if left_out else ""))


if __name__ == "__main__":
    fire.Fire(main)
