"""The evaluation report: ``report.md`` beside the metric files, for a person to read after an evaluation.

It holds the summary table (mean ± sd and median of legacy and lesion-wise Dice and HD95 per scored region, and
which labels and rules), box plots of those metrics per region (``boxplots.png``), the three worst cases drawn over
their images (``overlays/<case>.png``, by ``scripts.visualize``; only when the case folders are known) and every case
in one table, worst first. Worst means the lowest mean lesion-wise Dice over the scheme's scored regions, ties by case
id. Pictures are drawn on matplotlib's Agg canvas, never a display; every file is written atomically, the report last.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scripts.atomic import atomic_output, write_text_atomic
from scripts.errors import InputError
from scripts.labels import get_scheme
from scripts.metrics import CHALLENGES
from scripts.visualize import save_case_overlay

REPORT_FILE, BOXPLOT_FILE, OVERLAY_DIR = "report.md", "boxplots.png", "overlays"
NUM_WORST_DRAWN = 3
# The leaderboard's metrics, in the order the tables and plots show them.
HEADLINE_METRICS = {
    "lesionwise_dice": "lesion-wise Dice",
    "legacy_dice": "legacy Dice",
    "lesionwise_hd95": "lesion-wise HD95 (mm)",
    "legacy_hd95": "legacy HD95 (mm)",
}
RANKING_METRIC = "lesionwise_dice"
DPI = 100


def format_metric(metric: str, value: float) -> str:
    """A metric value as the tables print it: Dice to 4 decimals, distances in mm to 2."""
    return f"{value:.2f}" if metric.endswith("hd95") else f"{value:.4f}"


def statistics_cells(metric: str, values: Mapping[str, float]) -> list[str]:
    """The "mean ± sd" and "median" cells of one metric's summary statistics."""
    return [
        f"{format_metric(metric, values['mean'])} ± {format_metric(metric, values['std'])}",
        format_metric(metric, values["median"]),
    ]


def describe_rules(label_scheme: str, challenge: str) -> str:
    """Which labels were scored and under which official rules, in one line."""
    scheme = get_scheme(label_scheme)
    return f"labels {scheme.name} ({scheme.title}); official {challenge} rules: {CHALLENGES[challenge].description()}"


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write a figure as a PNG atomically; returns its path."""
    with atomic_output(path, suffix=".png") as temporary:
        figure.savefig(temporary, dpi=DPI)
    return Path(path)


def agg_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas (never a display), sized in inches."""
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def rank_cases(rows: Sequence[Mapping], regions: Sequence[str]) -> list[tuple[str, float]]:
    """(case, mean lesion-wise Dice over `regions`) of every case in the per-case rows, worst first, ties by case."""
    scores: dict[str, list[float]] = {}
    for row in rows:
        if row["region"] in regions:
            scores.setdefault(row["case"], []).append(float(row[RANKING_METRIC]))
    return sorted(((case, statistics.fmean(values)) for case, values in scores.items()), key=lambda c: (c[1], c[0]))


def boxplot_figure(rows: Sequence[Mapping], regions: Sequence[str]) -> Figure:
    """One panel per headline metric: a box per region, with every case as a dot."""
    figure = agg_figure(3.2 * len(HEADLINE_METRICS), 3.6)
    for ax, (metric, title) in zip(figure.subplots(1, len(HEADLINE_METRICS)), HEADLINE_METRICS.items(), strict=True):
        values = [[float(row[metric]) for row in rows if row["region"] == region] for region in regions]
        ax.boxplot(values, tick_labels=list(regions), showfliers=False)
        for position, region_values in enumerate(values, start=1):
            # Spread the dots sideways so that equal scores stay visible; evenly, so the picture is reproducible.
            offsets = np.linspace(-0.15, 0.15, len(region_values)) if len(region_values) > 1 else [0.0]
            ax.scatter(position + np.asarray(offsets), region_values, s=10, alpha=0.6, color="tab:blue")
        ax.set_title(title)
        ax.set_xlabel("region")
    return figure


def _draw_worst(
    output_dir: Path,
    worst: Sequence[tuple[str, float]],
    predictions: Mapping[str, str | Path],
    case_dirs: Mapping[str, str | Path] | None,
    label_scheme: str,
) -> list[str]:
    """Draw the worst cases over their images into OVERLAY_DIR; the report's lines for them."""
    overlay_dir = output_dir / OVERLAY_DIR
    drawn, lines = set(), []
    if case_dirs is None:
        lines += [
            "Overlays not drawn: the case images are not known "
            "(`python -m scripts.evaluate` draws them when given `--images_dir`, the dataset folder).",
            "",
        ]
    else:
        for rank, (case, score) in enumerate(worst, start=1):
            caption = f"{rank}. {case}: mean lesion-wise Dice {format_metric(RANKING_METRIC, score)}"
            path = overlay_dir / f"{case}.png"
            if case not in case_dirs:
                lines += [f"{caption}; overlay not drawn: its case folder is not known", ""]
                continue
            try:
                save_case_overlay(case_dirs[case], path, predictions[case], label_scheme)
            except InputError as error:  # a picture the data cannot give must not cost the scores already written
                lines += [f"{caption}; overlay not drawn: {'; '.join(error.problems)}", ""]
                continue
            drawn.add(path.name)
            lines += [caption, "", f"![{case}]({OVERLAY_DIR}/{path.name})", ""]
    # Pictures of cases that an earlier evaluation found worst would sit beside these, unexplained.
    if overlay_dir.is_dir():
        for stale in overlay_dir.glob("*.png"):
            if stale.name not in drawn and not stale.name.startswith("."):
                stale.unlink()
    return lines


def write_report(
    output_dir: str | Path,
    rows: Sequence[Mapping],
    summary: Mapping,
    predictions: Mapping[str, str | Path],
    case_dirs: Mapping[str, str | Path] | None = None,
) -> Path:
    """Write ``report.md``, ``boxplots.png`` and the worst cases' overlays to `output_dir`; returns the report's path.

    `rows` are the per-case metric rows and `summary` the evaluation summary (``scripts.evaluate.summarize``);
    `predictions` maps each case to its prediction and `case_dirs` to its case folder (None: overlays not drawn).
    """
    output_dir = Path(output_dir)
    label_scheme, challenge = summary["label_scheme"], summary["challenge"]
    regions = list(summary["regions"])
    ranked = rank_cases(rows, regions)
    save_figure(boxplot_figure(rows, regions), output_dir / BOXPLOT_FILE)
    worst_lines = _draw_worst(output_dir, ranked[:NUM_WORST_DRAWN], predictions, case_dirs, label_scheme)

    summary_body = [
        [region, title, *statistics_cells(metric, summary["regions"][region][metric])]
        for region in regions
        for metric, title in HEADLINE_METRICS.items()
    ]
    by_case = {(row["case"], row["region"]): row for row in rows}
    case_header = ["rank", "case", "mean lesion-wise Dice"]
    case_header += [f"{region} {title}" for region in regions for title in HEADLINE_METRICS.values()]
    case_body = [
        [
            str(rank),
            case,
            format_metric(RANKING_METRIC, score),
            *(
                format_metric(metric, float(by_case[case, region][metric]))
                for region in regions
                for metric in HEADLINE_METRICS
            ),
        ]
        for rank, (case, score) in enumerate(ranked, start=1)
    ]
    lines = [
        "# Evaluation report",
        "",
        f"{summary['num_cases']} case(s), {describe_rules(label_scheme, challenge)}.",
        "Every metric of every case and region: `metrics_per_case.csv`; every statistic: `summary.csv`, "
        "`summary.json`.",
        "",
        "## Summary",
        "",
        "Mean ± population standard deviation and median over the cases.",
        "",
        *markdown_table(["region", "metric", "mean ± sd", "median"], summary_body),
        "",
        "## Box plots",
        "",
        f"![Box plots of lesion-wise and legacy Dice and HD95 per region]({BOXPLOT_FILE})",
        "",
        f"## The {len(ranked[:NUM_WORST_DRAWN])} worst cases",
        "",
        *worst_lines,
        "## Every case, worst first",
        "",
        f"Sorted by the mean lesion-wise Dice over {', '.join(regions)}, lowest first (ties by case id).",
        "",
        *markdown_table(case_header, case_body),
    ]
    path = output_dir / REPORT_FILE
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
