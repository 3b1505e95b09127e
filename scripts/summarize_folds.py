"""The cross-validation table: every evaluated fold's per-case metrics summed up in one place.

python -m scripts.summarize_folds [--models_dir models] [--output_dir DIR]

An evaluated fold is a folder ``fold*`` holding ``evaluation/metrics_per_case.csv`` and ``evaluation/summary.json``
(what configs/evaluate.yaml writes), looked for in MODELS_DIR and one or two folders down (``FOLD_PATTERNS``:
``models/fold0``, ``models/<run>/fold0``, ``models/demo/brats2023_ped/fold0``). The folds must sit in one folder (one
cross-validation; pass that folder when there are several) and share label scheme, rules and regions; every problem
is listed in one error before anything is written. Writes to DIR (default MODELS_DIR): ``cv_summary.csv`` (per region
and metric: mean, population std, median and quartiles over all cases of all folds, then each fold's mean),
``cv_summary.md`` (the same for lesion-wise and legacy Dice and HD95) and ``cv_summary.png`` (each fold's mean
lesion-wise Dice per region).
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import fire
import numpy as np

from scripts.atomic import write_text_atomic
from scripts.errors import InputError, exit_on_input_error
from scripts.evaluate import (
    PER_CASE_COLUMNS,
    PER_CASE_FILE,
    SUMMARY_JSON_FILE,
    SUMMARY_STATISTICS,
    csv_text,
    summarize,
)
from scripts.labels import SCHEMES
from scripts.metrics import CHALLENGES
from scripts.report import (
    HEADLINE_METRICS,
    agg_figure,
    describe_rules,
    format_metric,
    markdown_table,
    save_figure,
    statistics_cells,
)

EVALUATION_DIR = "evaluation"
# A fold folder in MODELS_DIR, in a run folder inside it, or in <run>/<label scheme> as the demo writes them.
FOLD_PATTERNS = ("fold*", "*/fold*", "*/*/fold*")
CV_CSV_FILE, CV_MARKDOWN_FILE, CV_PLOT_FILE = "cv_summary.csv", "cv_summary.md", "cv_summary.png"
PLOTTED_METRIC = "lesionwise_dice"


@dataclass(frozen=True)
class FoldEvaluation:
    """One evaluated fold: its folder name, its per-case CSV and rows, and what was scored."""

    name: str
    path: Path
    rows: list[dict]
    label_scheme: str
    challenge: str
    regions: tuple[str, ...]


def find_fold_evaluations(models_dir: str | Path) -> list[Path]:
    """The per-case CSVs of the evaluated folds under ``models_dir`` (FOLD_PATTERNS), all in one folder, sorted by
    fold number; InputError when there are none or they sit in several folders."""
    root = Path(models_dir)
    if not root.is_dir():
        raise InputError(f"models folder not found: {root}")
    found = {
        path
        for pattern in FOLD_PATTERNS
        for path in root.glob(f"{pattern}/{EVALUATION_DIR}/{PER_CASE_FILE}")
        if not any(part.startswith(".") for part in path.relative_to(root).parts)
    }
    if not found:
        patterns = ", ".join(f"{root}/{pattern}/{EVALUATION_DIR}/{PER_CASE_FILE}" for pattern in FOLD_PATTERNS)
        raise InputError(
            f"no evaluated fold in {root}: looked for {patterns}; evaluate a fold first with configs/evaluate.yaml"
        )
    by_folder: dict[Path, list[Path]] = {}
    for path in found:
        by_folder.setdefault(path.parents[2], []).append(path)
    if len(by_folder) > 1:
        raise InputError(
            [
                f"evaluated folds in {len(by_folder)} folders under {root}; pass one as --models_dir:",
                *(
                    f"{folder}: {', '.join(sorted(path.parents[1].name for path in paths))}"
                    for folder, paths in sorted(by_folder.items())
                ),
            ]
        )
    return sorted(found, key=lambda path: _fold_order(path.parents[1].name))


def _fold_order(name: str) -> tuple[float, str]:
    """fold2 before fold10; names without a number last."""
    number = re.fullmatch(r"fold(\d+)", name)
    return (int(number[1]) if number else float("inf"), name)


def read_fold(path: Path) -> tuple[FoldEvaluation | None, list[str]]:
    """One fold's per-case rows and, from the ``summary.json`` beside them, its label scheme and rules; or None and
    the problems that stop it being read."""
    summary_path = path.parent / SUMMARY_JSON_FILE
    if not summary_path.is_file():
        return None, [f"{path}: no {SUMMARY_JSON_FILE} beside it; evaluate the fold again"]
    try:
        summary = json.loads(summary_path.read_text())
        with open(path, newline="") as file:
            reader = csv.DictReader(file)
            rows, columns = list(reader), tuple(reader.fieldnames or ())
    except (OSError, ValueError) as error:
        return None, [f"{path}: cannot read it or {summary_path.name} ({error})"]
    if columns != PER_CASE_COLUMNS:
        return None, [f"{path}: columns {', '.join(columns)}; expected {', '.join(PER_CASE_COLUMNS)}"]
    if not rows:
        return None, [f"{path}: no cases; evaluate the fold again"]
    if not isinstance(summary, dict) or not {"label_scheme", "challenge"} <= summary.keys():
        return None, [f"{summary_path}: no label_scheme and challenge; evaluate the fold again"]
    regions = tuple(dict.fromkeys(row["region"] for row in rows))
    name = path.parents[1].name
    return FoldEvaluation(name, path, rows, summary["label_scheme"], summary["challenge"], regions), []


def consistency_problems(folds: list[FoldEvaluation]) -> list[str]:
    """Folds scored differently, regions that are not their scheme's, and cases evaluated in more than one fold."""
    problems = []
    scored = {(fold.label_scheme, fold.challenge, fold.regions) for fold in folds}
    if len(scored) > 1:
        problems.append("the folds were scored differently; evaluate them all with one label scheme and rules:")
        problems += [
            f"{fold.path}: labels {fold.label_scheme}, {fold.challenge} rules, regions {', '.join(fold.regions)}"
            for fold in folds
        ]
    for fold in folds:
        if fold.challenge not in CHALLENGES:
            problems.append(f"{fold.path}: unknown rules {fold.challenge!r}; valid: {', '.join(CHALLENGES)}")
        if fold.label_scheme not in SCHEMES:
            problems.append(f"{fold.path}: unknown label scheme {fold.label_scheme!r}; valid: {', '.join(SCHEMES)}")
            continue
        expected = SCHEMES[fold.label_scheme].scored_regions
        if set(fold.regions) != set(expected):
            problems.append(
                f"{fold.path}: regions {', '.join(fold.regions)}; {fold.label_scheme} scores {', '.join(expected)}"
            )
    seen: dict[str, str] = {}
    for fold in folds:
        for case in dict.fromkeys(row["case"] for row in fold.rows):
            if case in seen:
                problems.append(f"{case}: evaluated in both {seen[case]} and {fold.name}; a case belongs to one fold")
            seen.setdefault(case, fold.name)
    return problems


def read_folds(paths: Iterable[Path], problems: list[str] | None = None) -> list:
    """The evaluations of ``paths``, read and checked against each other; one InputError listing every problem (with
    ``problems`` found before) when any has one."""
    folds, problems = [], list(problems or [])
    for path in paths:
        fold, fold_problems = read_fold(path)
        problems += fold_problems
        folds += [fold] if fold else []
    problems += consistency_problems(folds)
    if problems:
        raise InputError(problems)
    return folds


def summarize_folds(models_dir: str | Path = "models", output_dir: str | Path | None = None) -> dict:
    """Gather every evaluated fold under ``models_dir``, write cv_summary.csv, .md and .png to ``output_dir`` (default
    ``models_dir``) and return the summary: label scheme, rules, cases per fold, and per region and metric the
    statistics over all cases plus ``fold_means``."""
    folds = read_folds(find_fold_evaluations(models_dir))

    label_scheme, challenge = folds[0].label_scheme, folds[0].challenge
    overall = summarize([row for fold in folds for row in fold.rows], challenge, label_scheme)
    per_fold = {fold.name: summarize(fold.rows, challenge, label_scheme) for fold in folds}
    regions = {
        region: {
            metric: {
                **values,
                "fold_means": {name: fold["regions"][region][metric]["mean"] for name, fold in per_fold.items()},
            }
            for metric, values in metrics.items()
        }
        for region, metrics in overall["regions"].items()
    }
    cv_summary = {
        "label_scheme": label_scheme,
        "challenge": challenge,
        "num_cases": overall["num_cases"],
        "folds": {name: fold_summary["num_cases"] for name, fold_summary in per_fold.items()},
        "regions": regions,
    }
    output_dir = Path(output_dir if output_dir is not None else models_dir)
    _write_csv(cv_summary, output_dir / CV_CSV_FILE)
    save_figure(_fold_plot(cv_summary), output_dir / CV_PLOT_FILE)
    write_text_atomic(output_dir / CV_MARKDOWN_FILE, _markdown(cv_summary, folds, output_dir))
    return cv_summary


def _write_csv(cv_summary: dict, path: Path) -> None:
    folds = list(cv_summary["folds"])
    columns = ("region", "metric", *SUMMARY_STATISTICS, *(f"{name}_mean" for name in folds))
    rows = [
        {
            "region": region,
            "metric": metric,
            **{statistic: values[statistic] for statistic in SUMMARY_STATISTICS},
            **{f"{name}_mean": values["fold_means"][name] for name in folds},
        }
        for region, metrics in cv_summary["regions"].items()
        for metric, values in metrics.items()
    ]
    write_text_atomic(path, csv_text(columns, rows))


def _fold_plot(cv_summary: dict):
    """Bars of each fold's mean lesion-wise Dice, grouped by fold, one colour per region."""
    folds, regions = list(cv_summary["folds"]), list(cv_summary["regions"])
    figure = agg_figure(max(4.0, 1.2 * len(folds) + 2.0), 3.6)
    ax = figure.subplots()
    width = 0.8 / len(regions)
    positions = np.arange(len(folds))
    for index, region in enumerate(regions):
        means = cv_summary["regions"][region][PLOTTED_METRIC]["fold_means"]
        offset = (index - (len(regions) - 1) / 2) * width
        ax.bar(positions + offset, [means[name] for name in folds], width, label=region)
    ax.set_xticks(positions, folds)
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel(f"mean {HEADLINE_METRICS[PLOTTED_METRIC]}")
    ax.set_title(f"Mean {HEADLINE_METRICS[PLOTTED_METRIC]} per fold")
    figure.legend(title="region", loc="outside right upper")
    return figure


def _markdown(cv_summary: dict, folds: list[FoldEvaluation], output_dir: Path) -> str:
    names = list(cv_summary["folds"])
    cases = ", ".join(f"{name}: {count}" for name, count in cv_summary["folds"].items())
    body = [
        [
            region,
            title,
            *statistics_cells(metric, cv_summary["regions"][region][metric]),
            *(format_metric(metric, cv_summary["regions"][region][metric]["fold_means"][name]) for name in names),
        ]
        for region in cv_summary["regions"]
        for metric, title in HEADLINE_METRICS.items()
    ]
    lines = [
        "# Cross-validation summary",
        "",
        f"{len(names)} fold(s), {cv_summary['num_cases']} case(s) ({cases}); "
        f"{describe_rules(cv_summary['label_scheme'], cv_summary['challenge'])}.",
        "",
        "Mean ± population standard deviation and median over all cases of all folds, then each fold's mean.",
        "",
        *markdown_table(["region", "metric", "mean ± sd", "median", *(f"{name} mean" for name in names)], body),
        "",
        f"![Mean {HEADLINE_METRICS[PLOTTED_METRIC]} per fold and region]({CV_PLOT_FILE})",
        "",
        f"Every metric and quartile: `{CV_CSV_FILE}`. From:",
        "",
        *(f"- {name}: `{os.path.relpath(fold.path, output_dir)}`" for name, fold in zip(names, folds, strict=True)),
    ]
    return "\n".join(lines) + "\n"


def main(models_dir: str = "models", output_dir: str | None = None) -> None:
    """Gather every evaluated fold under --models_dir (fold*/evaluation/metrics_per_case.csv, also one or two folders
    down) into cv_summary.csv, cv_summary.md and cv_summary.png in --output_dir (default: --models_dir)."""
    with exit_on_input_error():
        cv_summary = summarize_folds(str(models_dir), output_dir)
    destination = Path(output_dir if output_dir is not None else models_dir)
    print(f"{len(cv_summary['folds'])} fold(s), {cv_summary['num_cases']} case(s), labels {cv_summary['label_scheme']}")
    print(f"{'region':<8}{'lesion-wise Dice':>19}{'legacy Dice':>14}")
    for region, metrics in cv_summary["regions"].items():
        print(f"{region:<8}{metrics['lesionwise_dice']['mean']:>19.4f}{metrics['legacy_dice']['mean']:>14.4f}")
    print(f"wrote {', '.join(str(destination / name) for name in (CV_CSV_FILE, CV_MARKDOWN_FILE, CV_PLOT_FILE))}")


if __name__ == "__main__":
    fire.Fire(main)
