"""Score predicted BraTS label maps against ground truth with the official metrics of their label scheme.

python -m scripts.evaluate --pred_dir P --gt_dir G --output_dir O [--label_scheme brats2023_ped] [--challenge PED]
                           [--images_dir D]

The label scheme (``scripts.labels``) says which regions are scored; the challenge names the official rules
(``scripts.metrics.CHALLENGES``). Each defaults to the other: ``--label_scheme brats2024_ped`` scores with the 2024
pediatric rules PED2024 and ``--challenge PED2024`` reads 2024 labels; neither means BraTS 2023 PED.
Predictions are ``<case-id>.nii.gz`` in P. Ground truth in G is in the BraTS layout (``<case-id>/<case-id>-seg.nii.gz``)
or flat (``<case-id>-seg.nii.gz`` or ``<case-id>.nii.gz``). Hidden files and folders (names starting with ".", such
as the temporaries an interrupted inference leaves) are ignored. Before anything is computed or written, every pair is
checked (readable, one grid, voxel values that are labels of the scheme) and all problems are reported in one error.
Writes ``metrics_per_case.csv`` (one row per case and scored region), ``summary.csv`` and ``summary.json`` to O,
then ``report.md`` (``scripts.report``): summary table, box plots, every case worst first, and the three worst cases
drawn over their images when D, a dataset folder in the BraTS layout holding every case, is given.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import sys
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
from tqdm import tqdm

from scripts.atomic import write_text_atomic
from scripts.cases import find_case_dirs, volume_problem
from scripts.errors import InputError, debugging
from scripts.labels import LabelScheme, get_scheme
from scripts.metrics import CHALLENGES, METRIC_NAMES, compute_case_metrics, resolve_rules
from scripts.report import write_report

NIFTI_SUFFIX = ".nii.gz"
SEG_SUFFIX = "-seg.nii.gz"
PER_CASE_FILE, SUMMARY_CSV_FILE, SUMMARY_JSON_FILE = "metrics_per_case.csv", "summary.csv", "summary.json"
PER_CASE_COLUMNS = ("case", "region", *METRIC_NAMES)
SUMMARY_STATISTICS = ("mean", "std", "median", "p25", "p75")
# Affines read back from NIfTI headers carry float32 rounding; anything larger is a different grid.
AFFINE_TOLERANCE = 1e-3
# Errors a damaged file raises while its header or voxels are read.
READ_ERRORS = (OSError, EOFError, zlib.error, nib.filebasedimages.ImageFileError)

CasePair = tuple[str, str, str]  # (case id, prediction path, ground-truth path)


class EvaluationInputError(InputError):
    """Predictions and ground truth do not pair up, share a grid or hold labels; the message lists every problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        self.args = (f"cannot evaluate, {len(self.problems)} problem(s):\n{lines}",)


def collect_case_pairs(pred_dir: str, gt_dir: str) -> tuple[list[CasePair], list[str]]:
    """Pair ``<case>.nii.gz`` predictions with ground-truth files by case id; also return the unpaired-case problems."""
    missing = [
        f"{role} folder {folder} does not exist"
        for role, folder in (("prediction", pred_dir), ("ground-truth", gt_dir))
        if not Path(folder).is_dir()
    ]
    if missing:
        return [], missing
    predictions = {
        path.name[: -len(NIFTI_SUFFIX)]: path for path in Path(pred_dir).glob(f"*{NIFTI_SUFFIX}") if not _hidden(path)
    }
    ground_truth, problems = _ground_truth_files(Path(gt_dir))
    for case in sorted(predictions.keys() - ground_truth.keys()):
        problems.append(f"{case}: prediction {predictions[case]} has no ground truth in {gt_dir}")
    for case in sorted(ground_truth.keys() - predictions.keys()):
        problems.append(
            f"{case}: ground truth {ground_truth[case]} has no prediction {case}{NIFTI_SUFFIX} in {pred_dir}"
        )
    if not predictions and not ground_truth:
        problems.append(f"no {NIFTI_SUFFIX} predictions in {pred_dir} and no ground truth in {gt_dir}")
    pairs = [
        (case, str(predictions[case]), str(ground_truth[case]))
        for case in sorted(predictions.keys() & ground_truth.keys())
    ]
    return pairs, problems


def _ground_truth_files(gt_dir: Path) -> tuple[dict[str, Path], list[str]]:
    """Ground-truth file per case id in either layout, and a problem for each case with more than one."""
    found: dict[str, list[Path]] = {}
    for path in sorted(gt_dir.iterdir()):
        if _hidden(path):
            continue
        if path.is_dir() and (path / f"{path.name}{SEG_SUFFIX}").is_file():
            found.setdefault(path.name, []).append(path / f"{path.name}{SEG_SUFFIX}")
        elif path.is_file() and path.name.endswith(NIFTI_SUFFIX):
            suffix = SEG_SUFFIX if path.name.endswith(SEG_SUFFIX) else NIFTI_SUFFIX
            found.setdefault(path.name[: -len(suffix)], []).append(path)
    problems = [
        f"{case}: several ground-truth files ({', '.join(map(str, paths))}); keep one"
        for case, paths in found.items()
        if len(paths) > 1
    ]
    return {case: paths[0] for case, paths in found.items()}, problems


def _hidden(path: Path) -> bool:
    """Hidden names are not cases: an interrupted atomic write leaves ``.<name>.partial...`` beside the outputs."""
    return path.name.startswith(".")


def check_case_pairs(pairs: Sequence[CasePair], scheme: LabelScheme) -> list[str]:
    """Problems that would stop scoring: no cases, repeated case ids, unreadable files, voxel values that are not
    labels of ``scheme``, shape or affine mismatches."""
    if not pairs:
        return ["no cases to evaluate"]
    case_ids = [case for case, _, _ in pairs]
    problems = [f"{case}: listed more than once" for case in sorted(set(case_ids)) if case_ids.count(case) > 1]
    for case, pred_path, gt_path in pairs:
        problems += _pair_problems(case, pred_path, gt_path, scheme)
    return problems


def _pair_problems(case: str, pred_path: str, gt_path: str, scheme: LabelScheme) -> list[str]:
    """Why one prediction cannot be scored against its ground truth; reads the voxels, since headers cannot tell
    which values a file holds."""
    images, problems = {}, []
    for role, path in (("prediction", pred_path), ("ground truth", gt_path)):
        try:
            image = nib.load(path)
            # Judge the values nibabel returns: a scl_slope turns integer storage into floats.
            value_problem = volume_problem(np.asanyarray(image.dataobj), label=True, scheme=scheme)
        except READ_ERRORS as error:
            problems.append(f"{case}: cannot read {role} {path} ({error})")
            continue
        images[role] = image
        problems += [f"{case}: {role} {path}: {value_problem}"] if value_problem else []
    if len(images) < 2:
        return problems
    return problems + _grid_problems(case, images["prediction"], images["ground truth"], gt_path)


def _grid_problems(
    case: str, pred: nib.spatialimages.SpatialImage, gt: nib.spatialimages.SpatialImage, gt_path: str
) -> list[str]:
    """Why a prediction does not lie on its ground truth's voxel grid."""
    if len(gt.shape) != 3:
        return [f"{case}: ground truth {gt_path} is not a 3-D label map (shape {gt.shape})"]
    if pred.shape != gt.shape:
        return [f"{case}: prediction shape {pred.shape} differs from ground-truth shape {gt.shape}"]
    if not np.allclose(pred.affine, gt.affine, rtol=0.0, atol=AFFINE_TOLERANCE):
        return [
            f"{case}: prediction affine differs from the ground-truth affine; resample it onto the ground-truth grid"
        ]
    return []


def _case_dir_problems(pairs: Sequence[CasePair], case_dirs: Mapping[str, str | Path], source: str) -> list[str]:
    """Why the report could not draw a case over its images: no case folder in ``case_dirs`` (found in ``source``),
    or one that does not exist."""
    problems = []
    for case, _, _ in pairs:
        if case not in case_dirs:
            problems.append(f"{case}: no case folder in {source}")
        elif not Path(case_dirs[case]).is_dir():
            problems.append(f"{case}: case folder {case_dirs[case]} does not exist")
    return problems


def _case_dirs_in(images_dir: str, pairs: Sequence[CasePair]) -> tuple[dict[str, Path], list[str]]:
    """The case folders of a dataset folder in the BraTS layout by case id, and the pairs' cases it lacks."""
    if not Path(images_dir).is_dir():
        return {}, [f"images folder {images_dir} does not exist"]
    case_dirs = {path.name: path for path in find_case_dirs(images_dir)}
    source = f"images folder {images_dir} (BraTS layout: <case>/<case>-t1c.nii.gz, directly or one folder down)"
    return case_dirs, _case_dir_problems(pairs, case_dirs, source)


def evaluate_cases(
    pairs: list[tuple[str, str, str]],
    output_dir: str,
    challenge: str | None = None,
    label_scheme: str | LabelScheme | None = None,
    case_dirs: Mapping[str, str | Path] | None = None,
) -> dict:
    """Score (case id, prediction path, GT path) pairs, write the per-case CSV, the summaries and the report, return
    the summary.

    ``challenge`` and ``label_scheme`` default to each other (``scripts.metrics.resolve_rules``); an unknown name is an
    InputError. ``case_dirs`` ({case id: case folder}) lets the report draw the worst cases over their images. Every
    problem with the inputs is reported in one EvaluationInputError before anything is computed.
    """
    challenge, scheme = resolve_rules(challenge, label_scheme)
    problems = check_case_pairs(pairs, scheme)
    problems += _case_dir_problems(pairs, case_dirs, "case_dirs") if case_dirs is not None else []
    if problems:
        raise EvaluationInputError(problems)
    return _score_cases(pairs, Path(output_dir), challenge, scheme, case_dirs)


def evaluate_folders(
    pred_dir: str,
    gt_dir: str,
    output_dir: str,
    challenge: str | None = None,
    label_scheme: str | LabelScheme | None = None,
    images_dir: str | None = None,
) -> dict:
    """Pair a prediction folder with a ground-truth folder by case id, then score as ``evaluate_cases`` does; the
    case folders in ``images_dir`` (BraTS layout) let the report draw the worst cases over their images."""
    challenge, scheme = resolve_rules(challenge, label_scheme)
    pairs, problems = collect_case_pairs(pred_dir, gt_dir)
    problems += check_case_pairs(pairs, scheme) if pairs else []
    case_dirs = None
    if images_dir is not None:
        case_dirs, image_problems = _case_dirs_in(str(images_dir), pairs)
        problems += image_problems
    if problems:
        raise EvaluationInputError(problems)
    return _score_cases(pairs, Path(output_dir), challenge, scheme, case_dirs)


def _score_cases(
    pairs: Sequence[CasePair],
    output_dir: Path,
    challenge: str,
    scheme: LabelScheme,
    case_dirs: Mapping[str, str | Path] | None,
) -> dict:
    """Compute every case's metrics, write the three result files, then the report."""
    rows = []
    for case, pred_path, gt_path in tqdm(pairs, desc="evaluate", unit="case"):
        pred_image, gt_image = nib.load(pred_path), nib.load(gt_path)
        metrics = compute_case_metrics(
            np.asanyarray(pred_image.dataobj),
            np.asanyarray(gt_image.dataobj),
            spacing=[float(zoom) for zoom in gt_image.header.get_zooms()[:3]],
            challenge=challenge,
            scheme=scheme,
        )
        rows += [{"case": case, **row} for row in metrics]
    summary = summarize(rows, challenge, scheme)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output_dir / PER_CASE_FILE, csv_text(PER_CASE_COLUMNS, rows))
    summary_rows = [
        {"region": region, "metric": metric, **values}
        for region, metrics in summary["regions"].items()
        for metric, values in metrics.items()
    ]
    write_text_atomic(output_dir / SUMMARY_CSV_FILE, csv_text(("region", "metric", *SUMMARY_STATISTICS), summary_rows))
    write_text_atomic(output_dir / SUMMARY_JSON_FILE, json.dumps(summary, indent=2) + "\n")
    write_report(output_dir, rows, summary, {case: pred_path for case, pred_path, _ in pairs}, case_dirs)
    return summary


def summarize(rows: Sequence[dict], challenge: str, label_scheme: str | LabelScheme) -> dict:
    """Mean, std, median, 25th and 75th percentile of every metric per scored region of the scheme over the per-case
    rows; also names the rules and the scheme."""
    scheme = get_scheme(label_scheme)
    cases = {row["case"] for row in rows}
    regions = {}
    for region in scheme.scored_regions:
        region_rows = [row for row in rows if row["region"] == region]
        regions[region] = {metric: _statistics([float(row[metric]) for row in region_rows]) for metric in METRIC_NAMES}
    return {"challenge": challenge, "label_scheme": scheme.name, "num_cases": len(cases), "regions": regions}


def _statistics(values: list[float]) -> dict[str, float]:
    """The summary statistics of one metric; population std, so that a single case gives 0 instead of an error."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values),
        "median": statistics.median(values),
        "p25": float(np.percentile(values, 25)),
        "p75": float(np.percentile(values, 75)),
    }


def format_summary(summary: dict) -> str:
    """A small table for the terminal: which labels and rules, then mean legacy and lesion-wise Dice per region."""
    scheme, challenge = get_scheme(summary["label_scheme"]), summary["challenge"]
    lines = [
        f"{summary['num_cases']} case(s), labels {scheme.name} ({scheme.title})",
        f"official {challenge} rules: {CHALLENGES[challenge].description()}",
        f"{'region':<8}{'legacy Dice':>14}{'lesion-wise Dice':>19}",
    ]
    for region, metrics in summary["regions"].items():
        legacy, lesionwise = metrics["legacy_dice"]["mean"], metrics["lesionwise_dice"]["mean"]
        lines.append(f"{region:<8}{legacy:>14.4f}{lesionwise:>19.4f}")
    return "\n".join(lines)


def csv_text(columns: Sequence[str], rows: Sequence[dict]) -> str:
    """CSV with exactly ``columns``, one line per row."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def main(
    pred_dir: str,
    gt_dir: str,
    output_dir: str,
    challenge: str | None = None,
    label_scheme: str | None = None,
    images_dir: str | None = None,
) -> None:
    """Score every prediction in ``pred_dir`` against ``gt_dir`` and write the results and report.md to
    ``output_dir``; with ``images_dir`` (the dataset folder) the report draws the three worst cases."""
    try:
        summary = evaluate_folders(str(pred_dir), str(gt_dir), str(output_dir), challenge, label_scheme, images_dir)
    except ValueError as error:  # bad inputs or an unknown challenge or scheme: the message says what to fix
        if debugging():
            raise
        sys.exit(f"error: {error}")
    print(format_summary(summary))


if __name__ == "__main__":
    fire.Fire(main)
