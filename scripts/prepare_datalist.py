"""Scan a BraTS-PEDs dataset, check every case and write a JSON datalist with cross-validation folds.

The datalist is the file the training config reads (``fold_split``): training cases (with seg) carry a fold
number (folds stratified by ET present or not and whole-tumour volume tertile, ``assign_folds``) and, to inspect
the folds, "has_et" and "tumour_voxels" (WT voxels); validation-challenge cases (without seg) are listed under
"testing"; and "label_scheme" names the labels the segmentations were checked against (given, or told from their
values by ``detect_label_scheme``). Paths are stored relative to the dataset folder so the file survives moving
the data. The case layout and the checks of a case are ``scripts.cases``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
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
    scheme_problems,
    schemes_fitting,
    survey_case,
    survey_folders,
)
from scripts.errors import InputError, exit_on_input_error
from scripts.labels import DEFAULT_SCHEME, SCHEMES, LabelScheme, get_scheme

# Reading a volume is mostly zlib decompression and numpy, which release the GIL: a few threads check
# several cases at once, and more would only compete for the disk.
SCAN_THREADS = min(8, os.cpu_count() or 1)
# Datalists written before they recorded a label scheme were all checked against the BraTS 2023 labels.
UNRECORDED_SCHEME = "brats2023_ped"
# Folds are stratified by ET present or not (a model's ET scores hinge on the ET-free cases, which score 1 or 0)
# and by whole-tumour volume tertile (small tumours are harder), so that folds are alike and their scores comparable.
TERTILES = 3
_EXAMPLES = 3


class DatasetError(InputError):
    """Cases failed their checks and strict mode refuses to leave them out."""


class LabelSchemeError(InputError):
    """The label values of a dataset do not tell its label scheme: --label_scheme has to name it."""


def volume_tertiles(tumour_voxels: Mapping[str, int]) -> dict[str, int]:
    """Tertile of each case's whole-tumour volume (0 the smallest third, 2 the largest), by rank over the cases
    given, ties broken by case id, so that each tertile holds a third of the cases to within one whatever the ties."""
    ranked = sorted(tumour_voxels, key=lambda case: (tumour_voxels[case], case))
    return {case: rank * TERTILES // len(ranked) for rank, case in enumerate(ranked)}


def assign_folds(
    case_ids: Sequence[str], num_folds: int, seed: int, strata: Mapping[str, tuple] | None = None
) -> dict[str, int]:
    """Folds whose sizes differ by at most 1 and that share each stratum of ``strata`` (case id -> a sortable key,
    e.g. (has ET, volume tertile)) alike, the same for a seed whatever the order of ``case_ids``.

    The cases are lined up stratum by stratum (keys sorted), each stratum's sorted ids shuffled by ``seed``, and
    dealt round-robin along the whole line: a stratum takes a run of consecutive places, so every fold gets its
    count to within one however small the stratum, and so does a run of strata sharing a first key (all ET-free
    cases). Without ``strata`` all cases are one stratum.
    """
    if not 2 <= num_folds <= len(case_ids):
        raise InputError(
            f"num_folds must be between 2 and the number of training cases ({len(case_ids)}), got {num_folds}"
        )
    rng = np.random.default_rng(seed)
    groups: dict[tuple, list[str]] = {}
    for case in sorted(case_ids):
        groups.setdefault(strata[case] if strata else (), []).append(case)
    line = [case for key in sorted(groups) for case in rng.permutation(groups[key]).tolist()]
    return {case: position % num_folds for position, case in enumerate(line)}


def fold_table(training: Sequence[Mapping], num_folds: int) -> list[str]:
    """Lines of a table of the folds of datalist training entries: cases, ET-free cases and cases per whole-tumour
    volume tertile, headed by the tertile's range of voxels (entries of older datalists, without "has_et" and
    "tumour_voxels", count as cases only)."""
    recorded = {entry["label"]: entry for entry in training if "has_et" in entry and "tumour_voxels" in entry}
    tertiles = volume_tertiles({label: int(entry["tumour_voxels"]) for label, entry in recorded.items()})
    counts = np.zeros((num_folds, 2 + TERTILES), dtype=int)
    ranges: list[list[int]] = [[] for _ in range(TERTILES)]
    for entry in training:
        counts[int(entry["fold"]), 0] += 1
    for label, entry in recorded.items():
        counts[int(entry["fold"]), 1] += not entry["has_et"]
        counts[int(entry["fold"]), 2 + tertiles[label]] += 1
        ranges[tertiles[label]].append(int(entry["tumour_voxels"]))
    header = ["fold", "cases", "ET-free", *(f"WT {min(r)}-{max(r)}" if r else "WT -" for r in ranges)]
    rows = [header, *([str(fold), *map(str, row)] for fold, row in enumerate(counts.tolist()))]
    widths = [max(map(len, column)) for column in zip(*rows, strict=True)]
    return ["  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]


def _in_training_folder(case_dir: Path) -> bool:
    """Cases under a challenge training folder must have a segmentation."""
    return "training" in case_dir.parent.name.lower()


def _scan(root: Path) -> tuple[list[str], list[tuple[dict, list[str], dict[int, int] | None]]]:
    """(problem lines of the folders and other cohorts' cases left out, and every pediatric case from
    ``case_files`` with its problem lines and segmentation voxels per value from ``survey_case``), in folder
    order."""
    case_dirs, problems = survey_folders(root)
    if not case_dirs:
        raise InputError(
            [
                f"no case folders under {root}: expected <case>/<case>-t1c.nii.gz etc. in {root} or one level down, "
                f"e.g. in {root}/{TRAINING_FOLDER} and {root}/{VALIDATION_FOLDER}, or {root}/Training and "
                f"{root}/Validation",
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
        surveys = list(pool.map(survey_case, cases))  # in the order of `cases`, whichever finishes first
    checked, seen = [], {}
    for case_dir, case, (case_problems, values) in zip(pediatric, cases, surveys, strict=True):
        if case["case"] in seen:
            case_problems.append(f"{case['case']}: {case_dir}: duplicate case id (also in {seen[case['case']]})")
        elif case["label"] is None and _in_training_folder(case_dir):
            missing = case_dir / case_file_name(case["case"], LABEL_KEY)
            case_problems.append(f"{case['case']}: {missing}: missing (cases in the training folder need one)")
        seen.setdefault(case["case"], case_dir)
        checked.append((case, case_problems, values))
    return problems, checked


def _as_found(name: str, found: set[int]) -> str:
    """A scheme as data holding only the `found` values shows it, e.g. "brats2024_ped without ED (4)"."""
    labels = SCHEMES[name].labels.items()
    missing = [f"{abbreviation} ({value})" for value, (abbreviation, _) in labels if value not in found]
    return name + (f" without {', '.join(missing)}" if missing else "")


def _mixture_error(seg_values: Mapping[str, set[int]], found: set[int]) -> LabelSchemeError:
    """The cases grouped by the schemes they fit, with examples of each group, for a dataset whose cases fit
    different schemes and no case tells which one all of them are in."""
    kinds: dict[tuple[str, ...], list[str]] = {}
    for path, values in seg_values.items():
        fitting = tuple(schemes_fitting(values))
        if len(fitting) < len(SCHEMES):  # a case that every scheme fits tells nothing
            kinds.setdefault(fitting, []).append(path)
    return LabelSchemeError(
        [
            f"label values {sorted(found)} found, in cases that look like a mix of label schemes:",
            *(
                f"{len(paths)} case(s) with label values {sorted(set().union(*(seg_values[path] for path in paths)))} "
                f"(they fit {' or '.join(fitting)}), e.g. {', '.join(map(case_id_from_path, paths[:_EXAMPLES]))}"
                for fitting, paths in kinds.items()
            ),
            "convert them to one scheme, or pass --label_scheme to check every case against one scheme "
            "(cases that do not fit it are left out and listed)",
        ]
    )


def detect_label_scheme(seg_values: Mapping[str, set[int]]) -> tuple[str, str]:
    """(name of the label scheme, why it was chosen) from the distinct values of each segmentation, keyed by
    its path; LabelSchemeError when the values do not tell it.

    Every brats2023_ped or brats2021 segmentation also fits brats2024_ped, so fitting alone decides nothing: a
    scheme that alone fits all values is chosen only if some case fits no other (2023 and 2021 cases side by
    side fit only brats2024_ped as a whole, but no case of theirs holds both 3 and 4); among several schemes
    that fit, the default is chosen (the labels this bundle always assumed); otherwise --label_scheme decides.
    """
    unfit = {path: values for path, values in seg_values.items() if not schemes_fitting(values)}
    if unfit:
        known = "; ".join(f"{name} {sorted(scheme.values)}" for name, scheme in SCHEMES.items())
        raise LabelSchemeError(
            [
                *(
                    f"{case_id_from_path(path)}: {path}: label values {sorted(values)} fit no label scheme"
                    for path, values in unfit.items()
                ),
                f"label schemes: {known}; fix the segmentations listed, or pass --label_scheme to check every case "
                "against one scheme (cases that do not fit it are left out and listed)",
            ]
        )
    if not seg_values:
        return DEFAULT_SCHEME, "no segmentations to tell it from: the default"
    found = set().union(*seg_values.values())
    candidates = schemes_fitting(found)
    if len(candidates) == 1:
        (name,) = candidates
        alone = [values for values in seg_values.values() if schemes_fitting(values) == candidates]
        if not alone:
            raise _mixture_error(seg_values, found)
        others = [other.values for other in SCHEMES.values() if other.name != name]
        together = " and ".join(map(str, sorted(set().union(*(SCHEMES[name].values - values for values in others)))))
        return name, f"label values {sorted(found)} found; {together} occur together in {len(alone)} case(s)"
    if DEFAULT_SCHEME in candidates:
        others = ", ".join(_as_found(other, found) for other in candidates if other != DEFAULT_SCHEME)
        return DEFAULT_SCHEME, (
            f"label values {sorted(found)} found, which the default {DEFAULT_SCHEME} fits; {others} would look the "
            "same: --label_scheme chooses another"
        )
    if candidates:
        fitting = "; ".join(f"{_as_found(name, found)} ({SCHEMES[name].title})" for name in candidates)
        raise LabelSchemeError(
            f"label values {sorted(found)} fit several label schemes alike: {fitting}; say which with "
            + " or ".join(f"--label_scheme {name}" for name in candidates)
        )
    raise _mixture_error(seg_values, found)


def _region_voxels(counts: Mapping[int, int], scheme: LabelScheme, region: str) -> int:
    """Voxels of `region` in a segmentation of `scheme` from its voxels per value."""
    return sum(counts.get(value, 0) for value in scheme.regions[region])


def _build_datalist(
    dataset_dir: str | Path, num_folds: int, seed: int, strict: bool, label_scheme: str | None
) -> tuple[dict, list[str], str]:
    """``make_datalist``'s datalist and problem lines, and why its label scheme was chosen."""
    if label_scheme is not None:
        label_scheme, reason = get_scheme(label_scheme).name, "given with --label_scheme"
    root = Path(dataset_dir).absolute()
    problems, checked = _scan(root)
    if label_scheme is None:
        label_scheme, reason = detect_label_scheme(
            {case["label"]: set(counts) for case, _, counts in checked if counts is not None}
        )
    cases, voxels = [], {}
    for case, case_problems, counts in checked:
        case_problems += scheme_problems(case, counts, label_scheme)
        problems += case_problems
        if not case_problems:
            cases.append(case)
            voxels[case["case"]] = counts
    if strict and problems:
        raise DatasetError(problems)

    def relative(path: str) -> str:
        return Path(os.path.relpath(path, root)).as_posix()

    scheme = get_scheme(label_scheme)
    training = [case for case in cases if case["label"] is not None]
    has_et = {case["case"]: _region_voxels(voxels[case["case"]], scheme, "ET") > 0 for case in training}
    tumour = {case["case"]: _region_voxels(voxels[case["case"]], scheme, "WT") for case in training}
    tertiles = volume_tertiles(tumour)
    strata = {case: (has_et[case], tertiles[case]) for case in has_et}
    folds = assign_folds(list(strata), num_folds, seed, strata) if training else {}
    datalist = {
        "label_scheme": label_scheme,
        "training": [
            {
                "image": [relative(p) for p in case["image"]],
                "label": relative(case["label"]),
                "fold": folds[case["case"]],
                "has_et": has_et[case["case"]],
                "tumour_voxels": tumour[case["case"]],
            }
            for case in training
        ],
        "testing": [{"image": [relative(p) for p in case["image"]]} for case in cases if case["label"] is None],
    }
    return datalist, problems, reason


def make_datalist(
    dataset_dir: str | Path, num_folds: int = 5, seed: int = 0, strict: bool = False, label_scheme: str | None = None
) -> tuple[dict, list[str]]:
    """(datalist with paths relative to ``dataset_dir``, problem lines of the cases left out).

    Each problem line starts with the case id (or the name of a folder that is not a case). Segmentations are
    checked against `label_scheme`, or without it against the scheme ``detect_label_scheme`` tells from them.
    ``strict`` raises ``DatasetError`` instead of leaving cases out.
    """
    datalist, problems, _ = _build_datalist(dataset_dir, num_folds, seed, strict, label_scheme)
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


def fold_split(
    datalist: str | Path | dict, dataset_dir: str | Path, fold: int, label_scheme: str | None = None
) -> tuple[list[dict], list[dict]]:
    """(training cases, validation cases) of ``fold``: dicts with absolute "image" and "label" paths and "case".

    Every case's headers are checked first, so that a datalist older than the data (a file deleted, truncated
    or regridded since) fails here with every problem listed, rather than hours into training. With
    `label_scheme`, a datalist whose labels were checked against another scheme is refused, since training on
    it would read every label with the wrong meaning.
    """
    name = "<datalist dict>" if isinstance(datalist, dict) else str(datalist)
    if not isinstance(datalist, dict):
        datalist = load_json(datalist)
    recorded = datalist.get("label_scheme", UNRECORDED_SCHEME)
    if label_scheme is not None and recorded != get_scheme(label_scheme).name:
        raise InputError(
            f"datalist {name} holds {recorded} labels, but label_scheme is {label_scheme}: set label_scheme to "
            f"{recorded}, or rebuild the datalist with python -m scripts.prepare_datalist --dataset_dir {dataset_dir} "
            f"--output {name} --label_scheme {label_scheme}"
        )
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


def main(
    dataset_dir: str,
    output: str,
    num_folds: int = 5,
    seed: int = 0,
    strict: bool = False,
    label_scheme: str | None = None,
) -> None:
    """Check the cases under DATASET_DIR and write the datalist JSON to OUTPUT (bad cases, and folders that are
    not cases, are left out and reported on stderr; with --strict any problem stops the script and nothing is
    written). Segmentations are checked against --label_scheme (brats2023_ped, brats2024_ped, brats2021), or
    without it against the scheme their values tell, which is printed with the reason. The --num_folds folds are
    stratified by ET present or not and whole-tumour volume tertile, the same for a --seed; a table of each fold's
    cases, ET-free cases and cases per tertile is printed."""
    with exit_on_input_error():
        try:
            datalist, problems, reason = _build_datalist(dataset_dir, num_folds, seed, strict, label_scheme)
        except DatasetError as error:
            for line in error.problems:
                print(line, file=sys.stderr)
            print(f"--strict: {len(error.problems)} problem(s), nothing written to {output}", file=sys.stderr)
            sys.exit(1)
    for line in problems:
        print(line, file=sys.stderr)
    write_json_atomic(datalist, output)

    left_out = sorted({line.split(": ", 1)[0] for line in problems})
    print(f"label scheme: {datalist['label_scheme']} ({reason})")
    print(f"wrote {output}")
    print(
        f"{len(datalist['training'])} training cases in {num_folds} folds, stratified by ET present or not and by "
        "whole-tumour volume tertile (WT voxels):"
    )
    for line in fold_table(datalist["training"], num_folds):
        print(f"  {line}")
    print(f"{len(datalist['testing'])} testing cases")
    print(f"{len(left_out)} left out" + (f" with problems: {', '.join(left_out)}" if left_out else ""))


if __name__ == "__main__":
    fire.Fire(main)
