"""Choose inference's post-processing on cross-validation, as nnU-Net does: for each network region the smallest
connected component to keep, then the fraction of the whole tumour below which enhancing tumour becomes
non-enhancing, each kept only if it raises the cross-validated lesion-wise Dice.

python -m scripts.tune_postprocessing --dataset_dir DIR [--datalist configs/datalist.json] [--evaluations models]
                                      [--output models/postprocessing.json] [--challenge C] [--num_workers N]

The evaluations are what configs/evaluate.yaml wrote for each fold: a models folder (its evaluated folds
``fold*/evaluation``, found as ``scripts.summarize_folds`` finds them), fold folders or evaluation folders. Each case
is read from ``<evaluation>/probabilities/<case>.npz`` (evaluate with ``--probabilities_dir`` pointing there) and
thresholded at 0.5 as inference does, or else from its label map ``<evaluation>/predictions/<case>.nii.gz``, which
must then be the raw prediction (evaluation's default): an evaluation whose ``inference.json`` records post-processing
is refused for its cases without probabilities. Its ground truth is the label of that case in the datalist's
fold the evaluation folder belongs to (``foldK``), so that every case is one the fold's model never trained on.

Search, greedy as nnU-Net's: from all values at 0, each network region in turn gets the component size of
MIN_COMPONENT_VOXELS that maximises the mean lesion-wise Dice of that region over all cases, the regions painted last
into the label map first (a component that a later region still covers keeps its label, e.g. an ET speck keeps TC),
then the enhancing tumour rule gets the fraction of MIN_ET_FRACTIONS that maximises the enhancing region's. A value is
adopted only if it raises that score and does not lower the mean over all scored regions, ties going to the smaller
value; rounds over these steps repeat until one changes nothing (at most MAX_ROUNDS). Every candidate is scored by
the official rules of the evaluations (``--challenge`` overrides) with the bundle's own metrics (without HD95), each
case's components labelled once, each distinct label map made once and each distinct region mask scored once. The cases
are loaded and scored in ``--num_workers`` processes (default: one per CPU), each keeping its cases; the scores are
the same whatever the number.

Prints the before/after table and writes the choice, the scores and every candidate's score atomically to
``--output``; configs/inference.yaml reads ``models/postprocessing.json`` when it is there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
from monai.transforms.utils import generate_spatial_bounding_box
from tqdm import tqdm

from scripts.atomic import write_text_atomic
from scripts.errors import InputError, exit_on_input_error
from scripts.evaluate import PER_CASE_FILE, READ_ERRORS, check_case_pairs
from scripts.labels import LabelScheme, get_scheme
from scripts.metrics import CHALLENGES, compute_case_metrics, crop_margin, get_challenge, resolve_rules
from scripts.postprocess import SmallEnhancingToNecrosisd, label_components, large_components
from scripts.prepare_datalist import fold_split
from scripts.summarize_folds import EVALUATION_DIR, find_fold_evaluations, read_folds

# Component sizes tried, in voxels of the input grid (mm^3 on BraTS data): 10 is what the 2024 scorer erases itself,
# 50 mm^3 the largest ground-truth lesion the 2023 rules leave unscored, 130 the 2023 winner's choice, and 500 (a
# ball 1 cm across) already removes lesions that the scorers count.
MIN_COMPONENT_VOXELS = (0, 10, 25, 50, 75, 100, 130, 200, 300, 500)
# Fractions of the whole tumour below which enhancing tumour becomes non-enhancing, around the 2023 winner's 0.04.
MIN_ET_FRACTIONS = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1)
PREDICTIONS_DIR, PROBABILITIES_DIR = "predictions", "probabilities"
# configs/inference.yaml#postprocessing's AsDiscreted. The saved probabilities are float16, so a voxel within about
# 1e-3 of it may fall on the other side than it did in the evaluation.
PROBABILITY_THRESHOLD = 0.5
# Rounds over all steps; the search stops early once a round changes nothing.
MAX_ROUNDS = 3
DEFAULT_OUTPUT = "models/postprocessing.json"
SOURCES = ("probabilities", "label map")
# Where an evaluation records its settings (scripts.inference.CasePredictor), and those that change the label maps.
INFERENCE_SUMMARY = "inference.json"
POSTPROCESSING = ("min_component_voxels", "min_et_fraction")
TABLE_METRICS = ("legacy_dice", "lesionwise_dice", "num_fp")


@dataclass(frozen=True)
class CaseRegions:
    """One cross-validation case, cropped to where its prediction or ground truth has something (plus the metrics'
    margin, so that the crop scores as the whole volume): the components of each predicted network region, labelled
    once, and the ground-truth label map."""

    case: str
    source: str  # one of SOURCES
    components: tuple[tuple[np.ndarray, np.ndarray], ...]  # per network region: component ids and voxel counts
    ground_truth: np.ndarray
    spacing: tuple[float, ...]


def enhancing_region(scheme: LabelScheme) -> str:
    """The scored region that is enhancing tumour alone: the one SmallEnhancingToNecrosisd relabels."""
    return next(name for name, values in scheme.regions.items() if values == {scheme.enhancing_label})


def postprocessed_label(
    case: CaseRegions, min_voxels: Sequence[int], min_fraction: float, scheme: LabelScheme
) -> np.ndarray:
    """The label map that inference's post-processing makes of the case with these values (cropped)."""
    regions = np.stack(
        [large_components(ids, sizes, size) for (ids, sizes), size in zip(case.components, min_voxels, strict=True)]
    )
    label = scheme.regions_to_labels(regions)
    return SmallEnhancingToNecrosisd("label", min_fraction, scheme)({"label": label})["label"][0]


class CaseScores:
    """The official metrics (TABLE_METRICS, without HD95) of one case under post-processing values. Most values change
    nothing in most cases and a value changes only some regions: each distinct label map is made once (values that
    keep the same components and the same ET fraction make the same map) and each distinct region mask scored once."""

    def __init__(self, case: CaseRegions, scheme: LabelScheme, challenge: str):
        self.case, self.scheme, self.challenge = case, scheme, challenge
        self.by_values: dict[tuple, dict[str, dict[str, float]]] = {}
        self.by_mask: dict[tuple[str, bytes], dict[str, float]] = {}

    def __call__(self, min_voxels: Sequence[int], min_fraction: float) -> dict[str, dict[str, float]]:
        """{scored region: {metric: value}}."""
        # A size keeps the components of at least that many voxels: how many it keeps says which.
        kept = tuple(
            int(np.count_nonzero(sizes[1:] >= size))
            for (_, sizes), size in zip(self.case.components, min_voxels, strict=True)
        )
        if (kept, min_fraction) not in self.by_values:
            label = postprocessed_label(self.case, min_voxels, min_fraction, self.scheme)
            keys = {
                region: (region, hashlib.blake2b(self.scheme.region_mask(label, region).tobytes()).digest())
                for region in self.scheme.scored_regions
            }
            new = [region for region, key in keys.items() if key not in self.by_mask]
            if new:
                rows = compute_case_metrics(
                    label, self.case.ground_truth, self.case.spacing, self.challenge, self.scheme, False, new
                )
                for row in rows:
                    self.by_mask[keys[row["region"]]] = {metric: row[metric] for metric in TABLE_METRICS}
            self.by_values[kept, min_fraction] = {region: self.by_mask[key] for region, key in keys.items()}
        return self.by_values[kept, min_fraction]


@dataclass(frozen=True)
class CaseFiles:
    """Where load_case finds a case, so that the process that scores it loads it."""

    case: str
    prediction: str
    ground_truth: str
    probabilities: Path


# The cases a worker process holds, by their index among all cases: each case is loaded and scored in one process,
# so its arrays never travel between processes.
_WORKER_CASES: dict[int, CaseScores] = {}


def _open_case(
    store: dict[int, CaseScores], index: int, case: CaseRegions | CaseFiles, scheme_name: str, challenge: str
) -> tuple[str | None, list[str]]:
    """Load a case (unless given loaded) into ``store``: its source, or the problems that it has."""
    scheme = get_scheme(scheme_name)
    if isinstance(case, CaseFiles):
        try:
            margin = crop_margin(get_challenge(challenge))
            case = load_case(case.case, case.prediction, case.ground_truth, case.probabilities, scheme, margin)
        except InputError as error:
            return None, error.problems
    store[index] = CaseScores(case, scheme, challenge)
    return case.source, []


def _case_scores(
    store: dict[int, CaseScores], index: int, candidates: Sequence[tuple[Sequence[int], float]]
) -> list[dict[str, dict[str, float]]]:
    """The scores of case ``index`` under each candidate (min_voxels, min_fraction)."""
    return [store[index](*candidate) for candidate in candidates]


def _in_worker(function: Callable, *args):
    """``function`` on the cases of the worker process it runs in."""
    return function(_WORKER_CASES, *args)


class CrossValidationScores:
    """Mean official metrics over all cases of the label maps that post-processing values make (CaseScores), the
    cases loaded and scored in this process, or spread over ``num_workers`` processes (over 1) that each keep theirs.
    The means are taken over the cases in their order, so the workers change nothing in the result."""

    def __init__(
        self, cases: Sequence[CaseRegions | CaseFiles], scheme: LabelScheme, challenge: str, num_workers: int = 0
    ):
        self.scheme, self.num_cases = scheme, len(cases)
        # Single-process pools, so that every call for a case goes to the process that holds it.
        self.pools = [ProcessPoolExecutor(1) for _ in range(min(num_workers, len(cases)))] if num_workers > 1 else []
        self.local: dict[int, CaseScores] = {}
        try:
            opened = self._per_case(
                _open_case, [(index, case, scheme.name, challenge) for index, case in enumerate(cases)], "load"
            )
            problems = [problem for _, case_problems in opened for problem in case_problems]
            if problems:
                raise InputError(problems)
        except BaseException:
            self.close()
            raise
        self.sources = {source: sum(found == source for found, _ in opened) for source in SOURCES}

    def _per_case(self, function: Callable, arguments: Sequence[tuple], desc: str | None = None) -> list:
        """``function(store, index, ...)`` of every case, in the process that holds the case; results in case order."""
        if not self.pools:
            return [function(self.local, *args) for args in tqdm(arguments, desc=desc, unit="case", disable=not desc)]
        futures = [
            self.pools[index % len(self.pools)].submit(_in_worker, function, *args)
            for index, args in enumerate(arguments)
        ]
        return [future.result() for future in tqdm(futures, desc=desc, unit="case", disable=not desc)]

    def __call__(self, candidates: Sequence[tuple[Sequence[int], float]]) -> list[dict[str, dict[str, float]]]:
        """For each candidate (min_voxels, min_fraction): {scored region: {metric: mean over the cases}}."""
        per_case = self._per_case(_case_scores, [(index, candidates) for index in range(self.num_cases)])
        return [
            {
                region: {
                    metric: float(np.mean([case[number][region][metric] for case in per_case]))
                    for metric in TABLE_METRICS
                }
                for region in self.scheme.scored_regions
            }
            for number in range(len(candidates))
        ]

    def close(self) -> None:
        for pool in self.pools:
            pool.shutdown(cancel_futures=True)

    def __enter__(self) -> CrossValidationScores:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def mean_lesionwise_dice(scores: dict[str, dict[str, float]]) -> float:
    """The mean lesion-wise Dice over all scored regions."""
    return float(np.mean([metrics["lesionwise_dice"] for metrics in scores.values()]))


def best_improvement(candidates: dict, current: dict[str, dict[str, float]], region: str) -> float | None:
    """The candidate value (of {value: scores}, in the grid's order) that raises ``region``'s mean lesion-wise Dice
    above ``current`` the most without lowering the mean over all scored regions; the first of equals; None if none
    raises it."""
    floor = mean_lesionwise_dice(current)
    allowed = [value for value, scores in candidates.items() if mean_lesionwise_dice(scores) >= floor]
    best = max(allowed, key=lambda value: candidates[value][region]["lesionwise_dice"], default=None)
    if best is None or candidates[best][region]["lesionwise_dice"] <= current[region]["lesionwise_dice"]:
        return None
    return best


def tune(
    cases: Sequence[CaseRegions | CaseFiles],
    scheme: LabelScheme,
    challenge: str,
    voxel_grid: Sequence[int] = MIN_COMPONENT_VOXELS,
    fraction_grid: Sequence[float] = MIN_ET_FRACTIONS,
    num_workers: int = 0,
) -> dict:
    """The search of the module docstring: the values chosen, the scores before and after, the last round's
    candidates with their lesion-wise Dice of the step's region and mean over all regions (``trials``) and how many
    cases came from each of SOURCES. ``num_workers`` over 1 loads and scores the cases in that many processes."""
    with CrossValidationScores(cases, scheme, challenge, num_workers) as scores:
        return _search(scores, scheme, voxel_grid, fraction_grid) | {"sources": scores.sources}


def _search(
    scores: CrossValidationScores, scheme: LabelScheme, voxel_grid: Sequence[int], fraction_grid: Sequence[float]
) -> dict:
    sizes, fraction = [0] * len(scheme.channels), 0.0
    before = current = scores([(sizes, fraction)])[0]
    # A component that a region painted later still covers keeps its label: the top of the paint order goes first.
    size_steps = [
        (region, scheme.channel_index(region))
        for region in dict.fromkeys(name for name, _ in reversed(scheme.paint_order))
    ]
    steps = [*size_steps, (enhancing_region(scheme), None)]
    trials: dict[str, dict] = {"min_component_voxels": {}, "min_et_fraction": {}}
    for round_number in range(1, MAX_ROUNDS + 1):
        changed = False
        for region, index in tqdm(steps, desc=f"tune, round {round_number}", unit="step"):
            if index is None:
                candidates = dict(zip(fraction_grid, scores([(sizes, value) for value in fraction_grid]), strict=True))
                trials["min_et_fraction"] = _trial(candidates, region)
            else:
                values = [([*sizes[:index], size, *sizes[index + 1 :]], fraction) for size in voxel_grid]
                candidates = dict(zip(voxel_grid, scores(values), strict=True))
                trials["min_component_voxels"][region] = _trial(candidates, region)
            chosen = best_improvement(candidates, current, region)
            if chosen is None:
                continue
            changed, current = True, candidates[chosen]
            if index is None:
                fraction = chosen
            else:
                sizes[index] = chosen
        if not changed:
            break
    return {
        "min_component_voxels": sizes,
        "min_et_fraction": fraction,
        "before": before,
        "after": current,
        "trials": trials,
    }


def _trial(candidates: dict, region: str) -> dict[str, dict[str, float]]:
    """{value: {region: its lesion-wise Dice, "all regions": the mean over all}} of one step, for the record."""
    return {
        str(value): {region: scores[region]["lesionwise_dice"], "all regions": mean_lesionwise_dice(scores)}
        for value, scores in candidates.items()
    }


def find_evaluations(paths: Sequence[str | Path]) -> list[Path]:
    """The per-case CSVs of the evaluations: each path an evaluation folder, a fold folder holding ``evaluation/``, or a
    models folder whose evaluated folds ``scripts.summarize_folds`` finds; InputError when one holds none."""
    found = []
    for path in map(Path, paths):
        if (path / PER_CASE_FILE).is_file():
            found.append(path / PER_CASE_FILE)
        elif (path / EVALUATION_DIR / PER_CASE_FILE).is_file():
            found.append(path / EVALUATION_DIR / PER_CASE_FILE)
        else:
            found += find_fold_evaluations(path)
    return list(dict.fromkeys(path.resolve() for path in found))


def _fold_cases(
    fold_name: str, evaluation: Path, cases: Sequence[str], datalist: str, dataset_dir: str, scheme: LabelScheme
) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(case, prediction, ground truth) of an evaluation's cases, the ground truth from its fold's validation cases in
    the datalist; and why a case has none."""
    number = re.fullmatch(r"fold(\d+)", fold_name)
    if number is None:
        return [], [f"{evaluation}: cannot tell its fold, since its folder {fold_name} is not named fold<K>"]
    _, validation_cases = fold_split(datalist, dataset_dir, int(number[1]), scheme.name)
    validation = {case["case"]: case["label"] for case in validation_cases}
    pairs, problems = [], []
    for case in cases:
        if case in validation:
            pairs.append((case, str(evaluation / PREDICTIONS_DIR / f"{case}.nii.gz"), validation[case]))
        else:
            problems.append(
                f"{case}: evaluated in {evaluation} but not a validation case of {fold_name} in datalist {datalist}"
            )
    return pairs, problems


def crop_case(
    case: str, source: str, regions: np.ndarray, ground_truth: np.ndarray, spacing: Sequence[float], margin: int
) -> CaseRegions:
    """A case from its predicted network regions (boolean, regions first) and its ground-truth label map on the same
    grid, cropped with ``margin`` (the metrics' crop_margin) and its components labelled."""
    start, end = generate_spatial_bounding_box(
        (regions.any(0) | (ground_truth > 0))[None], margin=margin, allow_smaller=True
    )
    # Nothing predicted and nothing to find still counts (every region scores 1): one background voxel stands for it.
    box = tuple(slice(low, max(high, low + 1)) for low, high in zip(start, end, strict=True))
    return CaseRegions(
        case=case,
        source=source,
        components=tuple(label_components(region[box]) for region in regions),
        ground_truth=ground_truth[box],
        spacing=tuple(float(size) for size in spacing),
    )


def _postprocessed_label_maps(evaluations: Iterable[Path]) -> list[str]:
    """A problem for each of `evaluations` whose label maps are read (no probabilities) but were post-processed, as
    its inference.json records (evaluations that recorded nothing are taken as they are)."""
    problems = []
    for evaluation in dict.fromkeys(evaluations):
        try:
            settings = json.loads((evaluation / INFERENCE_SUMMARY).read_text()).get("settings", {})
        except (OSError, ValueError, AttributeError):
            continue
        applied = {name: value for name, value in settings.items() if name in POSTPROCESSING and _nonzero(value)}
        if applied:
            listed = ", ".join(f"{name} {value}" for name, value in applied.items())
            problems.append(
                f"{evaluation}: its label maps were post-processed ({listed}) and it saved no probabilities to tune "
                f"on: evaluate the fold again with --probabilities_dir {evaluation / PROBABILITIES_DIR}"
            )
    return problems


def _nonzero(value: float | Sequence[float]) -> bool:
    return any(value) if isinstance(value, list | tuple) else bool(value)


def load_case(
    case: str, prediction: str, ground_truth: str, probabilities: Path, scheme: LabelScheme, margin: int
) -> CaseRegions:
    """A case's predicted regions (from ``probabilities`` when that file exists, else from the label map) and its
    ground truth, cropped; InputError naming the file that does not fit."""
    gt_image = nib.load(ground_truth)
    gt = np.asanyarray(gt_image.dataobj).astype(np.uint8)
    if probabilities.is_file():
        try:
            with np.load(probabilities) as saved:
                names, values = [str(name) for name in saved["regions"]], saved["probabilities"]
        except (*READ_ERRORS, KeyError, ValueError, zipfile.BadZipFile) as error:
            raise InputError(f"{case}: cannot read probabilities {probabilities} ({error})") from None
        if names != list(scheme.channels) or values.shape != (len(names), *gt.shape):
            raise InputError(
                f"{case}: probabilities {probabilities} hold regions {names} of shape {values.shape[1:]}; expected "
                f"{list(scheme.channels)} ({scheme.name}) on the ground truth's grid {gt.shape}"
            )
        regions, source = values >= PROBABILITY_THRESHOLD, SOURCES[0]
    else:
        regions, source = scheme.labels_to_regions(np.asanyarray(nib.load(prediction).dataobj)), SOURCES[1]
    spacing = gt_image.header.get_zooms()[:3]
    return crop_case(case, source, regions, gt, spacing, margin)


def _grid_problems(voxel_grid: Sequence[int], fraction_grid: Sequence[float]) -> list[str]:
    problems = []
    if not voxel_grid or any(type(size) is not int or size < 0 for size in voxel_grid):
        problems.append(f"min_component_voxels must be non-negative whole numbers, got {voxel_grid!r}")
    if not fraction_grid or any(type(value) not in (int, float) or not 0 <= value <= 1 for value in fraction_grid):
        problems.append(f"min_et_fractions must be numbers in [0, 1], got {fraction_grid!r}")
    return problems


def tune_postprocessing(
    dataset_dir: str,
    datalist: str = "configs/datalist.json",
    evaluations: Sequence[str | Path] = ("models",),
    output: str | Path = DEFAULT_OUTPUT,
    challenge: str | None = None,
    min_component_voxels: Sequence[int] = MIN_COMPONENT_VOXELS,
    min_et_fractions: Sequence[float] = MIN_ET_FRACTIONS,
    num_workers: int | None = None,
) -> dict:
    """Tune on every case of the evaluations (module docstring), write the record to ``output`` and return it.
    ``num_workers`` processes (default: one per CPU; 0 or 1: this one) load and score the cases.

    Every problem with the evaluations, the datalist, the pairs or the grids is reported in one InputError before any
    case is loaded.
    """
    folds = read_folds(find_evaluations(evaluations), _grid_problems(min_component_voxels, min_et_fractions))
    challenge, scheme = resolve_rules(challenge or folds[0].challenge, folds[0].label_scheme)
    pairs, problems = [], []
    for fold in folds:
        cases = list(dict.fromkeys(row["case"] for row in fold.rows))
        fold_pairs, fold_problems = _fold_cases(fold.name, fold.path.parent, cases, datalist, dataset_dir, scheme)
        pairs += [(fold.path.parent, *pair) for pair in fold_pairs]
        problems += fold_problems
    problems += check_case_pairs([pair[1:] for pair in pairs], scheme) if pairs else []
    problems += _postprocessed_label_maps(
        pair[0] for pair in pairs if not (pair[0] / PROBABILITIES_DIR / f"{pair[1]}.npz").is_file()
    )
    if problems:
        raise InputError(problems)

    cases = [
        CaseFiles(case, prediction, ground_truth, evaluation / PROBABILITIES_DIR / f"{case}.npz")
        for evaluation, case, prediction, ground_truth in pairs
    ]
    grids = {
        "min_component_voxels": sorted(set(min_component_voxels)),
        "min_et_fraction": sorted(set(min_et_fractions)),
    }
    workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    result = tune(cases, scheme, challenge, grids["min_component_voxels"], grids["min_et_fraction"], workers)
    enhancing = enhancing_region(scheme)
    record = {
        "label_scheme": scheme.name,
        "challenge": challenge,
        "regions": list(scheme.channels),
        "min_component_voxels": result["min_component_voxels"],
        "min_et_fraction": result["min_et_fraction"],
        "enhancing_rule": {
            "region": enhancing,
            "from_label": scheme.enhancing_label,
            "to_label": scheme.non_enhancing_label,
        },
        "criterion": f"mean lesion-wise Dice over the cases, official {challenge} rules",
        "evaluations": [str(fold.path.parent) for fold in folds],
        "cases": {fold.name: list(dict.fromkeys(row["case"] for row in fold.rows)) for fold in folds},
        "sources": result["sources"],
        "grids": grids,
        "scores": {"before": result["before"], "after": result["after"]},
        "trials": result["trials"],
    }
    write_text_atomic(output, json.dumps(record, indent=2) + "\n")
    return record


def format_table(record: dict) -> str:
    """The before/after table for the terminal, then what was chosen."""
    scheme = get_scheme(record["label_scheme"])
    before, after = record["scores"]["before"], record["scores"]["after"]
    sizes = dict(zip(record["regions"], record["min_component_voxels"], strict=True))
    rule, fraction = record["enhancing_rule"], record["min_et_fraction"]
    names = {value: abbreviation for value, (abbreviation, _) in scheme.labels.items()}
    sources = ", ".join(f"{count} from {source}" for source, count in record["sources"].items() if count)
    lines = [
        f"{sum(map(len, record['cases'].values()))} case(s) of {len(record['cases'])} fold(s) ({sources}), labels "
        f"{scheme.name}, official {record['challenge']} rules: {CHALLENGES[record['challenge']].description()}",
        f"{'region':<8}{'legacy Dice':>18}{'lesion-wise Dice':>20}{'FP lesions/case':>18}{'min voxels':>12}",
        f"{'':<8}{'before   after':>18}{'before   after':>20}{'before   after':>18}",
    ]
    for region in scheme.scored_regions:
        cells = "".join(
            f"{before[region][metric]:>{width}{form}}{after[region][metric]:>8{form}}"
            for metric, width, form in zip(TABLE_METRICS, (10, 12, 10), (".4f", ".4f", ".2f"), strict=True)
        )
        lines.append(f"{region:<8}{cells}{sizes.get(region, '-'):>12}")
    lines.append(f"mean lesion-wise Dice {mean_lesionwise_dice(before):.4f} -> {mean_lesionwise_dice(after):.4f}")
    rule_text = f"{rule['region']} -> {names[rule['to_label']]} (label {rule['from_label']} -> {rule['to_label']})"
    lines.append(
        f"{rule_text} where {rule['region']} is below {fraction:g} of the whole tumour"
        if fraction
        else f"{rule_text} by fraction of the whole tumour: not adopted (min_et_fraction 0)"
    )
    return "\n".join(lines)


def main(
    dataset_dir: str,
    datalist: str = "configs/datalist.json",
    evaluations: str | Sequence[str] = "models",
    output: str = DEFAULT_OUTPUT,
    challenge: str | None = None,
    min_component_voxels: Sequence[int] = MIN_COMPONENT_VOXELS,
    min_et_fractions: Sequence[float] = MIN_ET_FRACTIONS,
    num_workers: int | None = None,
) -> None:
    """Choose the post-processing on the evaluated folds in --evaluations (a models folder, fold folders or evaluation
    folders) against their ground truth in --datalist (paths relative to --dataset_dir), print the before/after table
    and write the choice to --output, which configs/inference.yaml reads from models/postprocessing.json. Cases are
    loaded and scored in --num_workers processes (default: one per CPU; 0 or 1: none besides this one)."""
    with exit_on_input_error():
        record = tune_postprocessing(
            str(dataset_dir),
            str(datalist),
            [evaluations] if isinstance(evaluations, str) else list(evaluations),
            output,
            challenge,
            list(min_component_voxels),
            list(min_et_fractions),
            num_workers,
        )
    print(format_table(record))
    print(f"wrote {output}")


if __name__ == "__main__":
    fire.Fire(main)
