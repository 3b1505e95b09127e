"""Scan a BraTS-PED 2023 dataset, check every case and write a JSON datalist with cross-validation folds.

The datalist is the file the training config reads (``fold_split``): training cases (with seg) carry
a fold number, validation-challenge cases (without seg) are listed under "testing". Paths are stored
relative to the dataset folder so the file survives moving the data. The case layout and the checks
of a case are ``scripts.cases``.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fire
import numpy as np

from scripts.atomic import write_text_atomic
from scripts.cases import (
    LABEL_KEY,
    TRAINING_FOLDER,
    VALIDATION_FOLDER,
    case_file_name,
    case_files,
    case_id_from_path,
    check_case,
    cohort_problem,
    survey_folders,
)
from scripts.errors import InputError

# Reading a volume is mostly zlib decompression and numpy, which release the GIL: a few threads check
# several cases at once, and more would only compete for the disk.
SCAN_THREADS = min(8, os.cpu_count() or 1)


class DatasetError(InputError):
    """Cases failed their checks and strict mode refuses to leave them out."""


def assign_folds(case_ids: list[str], num_folds: int, seed: int) -> dict[str, int]:
    """Balanced folds (sizes differ by at most 1): sorted ids shuffled by ``seed``, dealt round-robin."""
    if not 2 <= num_folds <= len(case_ids):
        raise InputError(
            f"num_folds must be between 2 and the number of training cases ({len(case_ids)}), got {num_folds}"
        )
    order = np.random.default_rng(seed).permutation(len(case_ids))
    ids = sorted(case_ids)
    return {ids[index]: position % num_folds for position, index in enumerate(order)}


def _in_training_folder(case_dir: Path) -> bool:
    """Cases under a challenge training folder must have a segmentation."""
    return "training" in case_dir.parent.name.lower()


def _scan(root: Path) -> tuple[list[dict], list[str]]:
    """Usable cases (from ``case_files``) and the problem lines of every case and folder left out."""
    case_dirs, problems = survey_folders(root)
    if not case_dirs:
        raise InputError(
            [
                f"no case folders under {root}: expected <case>/<case>-t1c.nii.gz etc. in {root} "
                f"or in {root}/{TRAINING_FOLDER} and {root}/{VALIDATION_FOLDER}",
                *problems,
            ]
        )
    pediatric = []
    for case_dir in case_dirs:
        other_cohort = cohort_problem(case_dir.name)
        if other_cohort:
            problems.append(f"{case_dir.name}: {case_dir}: {other_cohort}")
        else:
            pediatric.append(case_dir)
    cases = [case_files(case_dir) for case_dir in pediatric]
    with ThreadPoolExecutor(max_workers=SCAN_THREADS) as pool:
        checks = list(pool.map(check_case, cases))  # in the order of `cases`, whichever finishes first
    usable, seen = [], {}
    for case_dir, case, case_problems in zip(pediatric, cases, checks, strict=True):
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

    Each problem line starts with the case id (or the name of a folder that is not a case). ``strict`` raises
    ``DatasetError`` instead of leaving cases out.
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
        raise InputError(f"datalist not found: {path} (write one with: python -m scripts.prepare_datalist)") from None
    except json.JSONDecodeError as error:
        raise InputError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(content, dict):
        raise InputError(f"{path} should hold a JSON object with 'training' and 'testing' lists")
    return content


def fold_split(datalist: str | Path | dict, dataset_dir: str | Path, fold: int) -> tuple[list[dict], list[dict]]:
    """(training cases, validation cases) of ``fold``: dicts with absolute "image" and "label" paths and "case".

    Every case's headers are checked first, so that a datalist older than the data (a file deleted, truncated
    or regridded since) fails here with every problem listed, rather than hours into training.
    """
    name = "<datalist dict>" if isinstance(datalist, dict) else str(datalist)
    if not isinstance(datalist, dict):
        datalist = load_json(datalist)
    entries = datalist.get("training", [])
    if any("fold" not in entry for entry in entries):
        raise InputError(
            f"datalist {name} has training entries without 'fold'; rebuild it with scripts.prepare_datalist"
        )
    folds = sorted({int(entry["fold"]) for entry in entries})
    if fold not in folds:
        raise InputError(f"fold {fold} is not in datalist {name}; folds present: {folds}")

    def absolute(path: str) -> str:
        return os.path.abspath(os.path.join(dataset_dir, path))

    train, val, problems = [], [], []
    for entry in entries:
        case = {
            "image": [absolute(p) for p in entry["image"]],
            "label": absolute(entry["label"]),
            "case": case_id_from_path(entry["image"][0]),
        }
        problems += check_case(case, check_data=False)
        (val if int(entry["fold"]) == fold else train).append(case)
    if problems:
        raise InputError(
            [
                *problems,
                f"the datalist {name} no longer matches the data in {dataset_dir}: rebuild it with "
                f"python -m scripts.prepare_datalist --dataset_dir {dataset_dir} --output {name}",
            ]
        )
    return train, val


def main(dataset_dir: str, output: str, num_folds: int = 5, seed: int = 0, strict: bool = False) -> None:
    """Check the cases under DATASET_DIR and write the datalist JSON to OUTPUT (bad cases, and folders that are
    not cases, are left out and reported on stderr; with --strict any problem stops the script and nothing is
    written)."""
    try:
        datalist, problems = make_datalist(dataset_dir, num_folds, seed, strict)
    except DatasetError as error:
        for line in error.problems:
            print(line, file=sys.stderr)
        print(f"--strict: {len(error.problems)} problem(s), nothing written to {output}", file=sys.stderr)
        sys.exit(1)
    except InputError as error:
        for line in error.problems:
            print(f"error: {line}", file=sys.stderr)
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
