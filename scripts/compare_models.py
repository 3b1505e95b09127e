"""Models side by side on the same held-out cases, from what their training and evaluation runs wrote.

python -m scripts.compare_models RUN_DIR [RUN_DIR ...] [--names "['Swin UNETR', '2D U-Net']"] [--output FILE.md]
    [--evaluation evaluation]

A RUN_DIR is a training output folder (``models/fold0``, ``models/unet2d/fold0``, ...) after the evaluation config
ran on it: ``evaluation/summary.json`` (scores), ``evaluation/inference.json`` (seconds per case, peak RAM),
``metrics.csv`` (each epoch's seconds and peak RAM) and ``model.pt`` (parameters). Prints, and writes with
`--output`, one Markdown table: per region mean legacy and lesion-wise Dice, training minutes, inference seconds per
case, parameters and peak RAM of training and of inference. The runs must have scored the same cases with the same
rules; anything missing or different is listed in one error.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import fire
import torch

from scripts.atomic import write_text_atomic
from scripts.errors import InputError, exit_on_input_error
from scripts.evaluate import PER_CASE_FILE

# Buffers that a state dict holds beside the parameters (Swin UNETR's relative position indices are integers).
NOT_PARAMETERS = ("running_mean", "running_var")


def run_files(evaluation: str) -> tuple[str, ...]:
    return (
        f"{evaluation}/summary.json",
        f"{evaluation}/{PER_CASE_FILE}",
        f"{evaluation}/inference.json",
        "metrics.csv",
        "model.pt",
    )


def read_run(run_dir: Path, evaluation: str = "evaluation") -> dict:
    """The figures of one evaluated training run, its scores from the folder `evaluation`."""
    summary_file, per_case_file, inference_file, metrics_file, weights_file = run_files(evaluation)
    summary = json.loads((run_dir / summary_file).read_text())
    with open(run_dir / per_case_file, newline="") as file:
        cases = {row["case"] for row in csv.DictReader(file)}
    inference = json.loads((run_dir / inference_file).read_text())
    with open(run_dir / metrics_file, newline="") as file:
        epochs = list(csv.DictReader(file))
    weights = torch.load(run_dir / weights_file, map_location="cpu", weights_only=True)
    return {
        "summary": summary,
        "cases": cases,
        "dice": {
            region: (scores["legacy_dice"]["mean"], scores["lesionwise_dice"]["mean"])
            for region, scores in summary["regions"].items()
        },
        "epochs": len(epochs),
        "training_minutes": sum(float(row["seconds"]) for row in epochs) / 60,
        "training_ram_gb": max(float(row["peak_ram_gb"]) for row in epochs),
        "seconds_per_case": inference["seconds_per_case"],
        "inference_ram_gb": inference["peak_ram_gb"],
        "parameters": sum(
            tensor.numel()
            for name, tensor in weights.items()
            if tensor.is_floating_point() and not name.endswith(NOT_PARAMETERS)
        ),
    }


def comparison_problems(run_dirs: list[Path], evaluation: str) -> list[str]:
    problems = [
        f"{run_dir}: {name} is missing (train, then run the evaluation config on this run)"
        for run_dir in run_dirs
        for name in run_files(evaluation)
        if not (run_dir / name).is_file()
    ]
    if not problems:
        for run_dir in run_dirs:
            with open(run_dir / "metrics.csv", newline="") as file:
                if "seconds" not in (csv.DictReader(file).fieldnames or []):
                    problems.append(f"{run_dir}: metrics.csv has no seconds column (written by an older version)")
    return problems


def comparison_table(runs: dict[str, dict]) -> str:
    """Markdown: one row per run."""
    regions = list(next(iter(runs.values()))["dice"])
    header = (
        ["model"]
        + [f"{region} legacy / lesion-wise Dice" for region in regions]
        + ["epochs", "training (min)", "inference (s/case)", "parameters (M)", "peak RAM train / infer (GB)"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, run in runs.items():
        cells = [name] + [f"{legacy:.3f} / {lesionwise:.3f}" for legacy, lesionwise in run["dice"].values()]
        cells += [
            str(run["epochs"]),
            f"{run['training_minutes']:.1f}",
            f"{run['seconds_per_case']:.1f}",
            f"{run['parameters'] / 1e6:.2f}",
            f"{run['training_ram_gb']:.1f} / {run['inference_ram_gb']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_models(
    run_dirs: Sequence[str | Path],
    names: Sequence[str] | None = None,
    output: str | Path | None = None,
    evaluation: str = "evaluation",
) -> str:
    """The Markdown table of the evaluated training runs `run_dirs` (rows named `names`, default the folders), scored
    in each run's folder `evaluation` (the evaluation config's `--evaluation_dir`), also written to `output`."""
    paths = [Path(run_dir) for run_dir in run_dirs]
    if not paths:
        raise InputError("name at least one training output folder, e.g. models/fold0 models/unet2d/fold0")
    names = [str(path) for path in paths] if names is None else list(names)
    problems = comparison_problems(paths, evaluation)
    if len(names) != len(paths):
        problems.append(f"{len(names)} names for {len(paths)} runs")
    if problems:
        raise InputError(problems)
    runs = {name: read_run(path, evaluation) for name, path in zip(names, paths, strict=True)}
    first = next(iter(runs.values()))
    keys = ("num_cases", "challenge", "label_scheme")
    for name, run in runs.items():
        scored = [run["summary"][key] for key in keys]
        if scored != [first["summary"][key] for key in keys]:
            problems.append(f"{name}: scored {scored} (cases, rules, labels), unlike the first run")
        elif run["cases"] != first["cases"]:
            others, missing = sorted(run["cases"] - first["cases"]), sorted(first["cases"] - run["cases"])
            problems.append(
                f"{name}: scored other cases than the first run ({', '.join(others)} for {', '.join(missing)})"
            )
    if problems:
        raise InputError(problems)
    table = comparison_table(runs)
    if output is not None:
        write_text_atomic(output, table)
    return table


def main(
    *run_dirs: str, names: Sequence[str] | None = None, output: str | None = None, evaluation: str = "evaluation"
) -> None:
    """Print the table of the evaluated training runs RUN_DIRS, rows named --names, scored in each run's folder
    --evaluation (and write it to --output)."""
    with exit_on_input_error():
        print(compare_models(run_dirs, names, output, evaluation), end="")


if __name__ == "__main__":
    fire.Fire(main)
