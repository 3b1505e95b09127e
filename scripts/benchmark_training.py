"""Time training as the bundle runs it, to size a run: iterations per second, seconds per epoch, the training cache's
build time, peak RAM and peak GPU memory, for the demo config (train.yaml + demo.yaml) and the default one
(train.yaml), on full-size synthetic BraTS-PED cases (240 x 240 x 155, 1 mm) or the cases of --dataset_dir.

python -m scripts.benchmark_training [--configs both|demo|default] [--num_cases 4] [--iterations N]
    [--warmup_iterations 1] [--dataset_dir DIR] [--device cuda:0|cpu] [--overrides '{"KEY": VALUE, ...}']

Each config is built by MONAI's ConfigWorkflow from the config files as they are, as `monai.bundle run training`
builds it, and runs in a fresh process so that its peak memory is its own. The benchmark sets only what it must:
the datalist (the first --num_cases cases to train on; the first of them again as fold 0's validation case, so that
nothing else is cached), a temporary output folder, and validation off (it runs every val_interval epochs and is not
part of a training iteration). --overrides override both configs, as --KEY VALUE pairs do in `monai.bundle run`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import fire
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from scripts.errors import InputError, exit_on_input_error
from scripts.labels import DEFAULT_SCHEME
from scripts.prepare_datalist import make_datalist, write_json_atomic
from scripts.resources import in_fresh_process, peak_memory
from scripts.synthetic import BRATS_SHAPE, generate_dataset

CONFIG_DIR = Path(__file__).parents[1] / "configs"
CONFIGS = {"demo": ("train.yaml", "demo.yaml"), "default": ("train.yaml",)}
COLUMNS = (
    "config",
    "spacing_mm",
    "roi",
    "feature",
    "crops/it",
    "AMP",
    "iterations",
    "it/s",
    "s/epoch",
    "cache_s",
    "cache_RAM_GB",
    "peak_RAM_GB",
    "peak_GPU_GB",
)


def benchmark_datalist(dataset_dir: str | Path, num_cases: int, label_scheme: str | None = None) -> dict:
    """A datalist of `dataset_dir` (checked by prepare_datalist) whose fold 0 trains on its first `num_cases` cases
    and validates on the first of them."""
    datalist, problems = make_datalist(dataset_dir, num_folds=2, label_scheme=label_scheme)
    cases = datalist["training"][:num_cases]
    if len(cases) < num_cases:
        raise InputError(
            [*problems, f"{dataset_dir} has {len(cases)} usable training cases, fewer than --num_cases {num_cases}"]
        )
    return {**datalist, "training": [{**case, "fold": 1} for case in cases] + [{**cases[0], "fold": 0}]}


def measure(name: str, overrides: dict, iterations: int | None, warmup_iterations: int) -> dict:
    """Run config `name` with `overrides` for `warmup_iterations` + `iterations` (default: one epoch) training
    iterations and return what it cost; call it in a fresh process, since peak memory is the process's."""
    workflow = ConfigWorkflow(
        config_file=[str(CONFIG_DIR / file) for file in CONFIGS[name]], workflow_type="train", **overrides
    )
    workflow.initialize()
    parsed = workflow.parser.get_parsed_content
    start = time.perf_counter()
    parsed("train#dataset")  # a CacheDataset builds its cache here
    cache_seconds = time.perf_counter() - start
    cache_ram = peak_memory()["peak_ram_gb"]
    trainer = parsed("train#trainer")
    epoch_length = trainer.state.epoch_length
    iterations = iterations or epoch_length
    total = warmup_iterations + iterations
    done = []

    def record(engine) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels have run, not only been queued
        done.append(time.perf_counter())
        step = done[-1] - (done[-2] if len(done) > 1 else run_start)
        print(f"{name}: iteration {len(done)}/{total} in {step:.2f} s", file=sys.stderr, flush=True)
        if len(done) == total:
            engine.terminate()

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    run_start = time.perf_counter()
    workflow.run()
    if len(done) < total:
        raise InputError(
            f"{name}: the schedule ended after {len(done)} iterations, fewer than the {total} asked for; "
            "ask for fewer --iterations or more --num_epochs"
        )
    seconds = done[-1] - (done[warmup_iterations - 1] if warmup_iterations else run_start)
    return {
        "config": name,
        "spacing": parsed("spacing"),
        "roi_size": parsed("roi_size"),
        "feature_size": parsed("feature_size"),
        "crops_per_iteration": parsed("batch_size") * parsed("crops_per_case"),
        "amp": bool(parsed("amp")),
        "device": str(parsed("device")),
        "cases": len(parsed("train#dataset")),
        "iterations_per_epoch": epoch_length,
        "iterations": iterations,
        "iterations_per_second": iterations / seconds,
        "seconds_per_epoch": epoch_length * seconds / iterations,
        "cache_seconds": cache_seconds,
        "cache_ram_gb": cache_ram,
        **peak_memory(),
    }


def _figure(value: float) -> str:
    """3 significant figures, without an exponent for large values."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _size(values: list[float]) -> str:
    return "x".join(f"{v:g}" for v in values) if len(set(values)) > 1 else f"{values[0]:g}"


def table_row(result: dict) -> list[str]:
    """`result` of `measure` as the cells of COLUMNS."""
    return [
        result["config"],
        _size(result["spacing"]),
        "x".join(str(size) for size in result["roi_size"]),
        str(result["feature_size"]),
        str(result["crops_per_iteration"]),
        "yes" if result["amp"] else "no",
        str(result["iterations"]),
        _figure(result["iterations_per_second"]),
        _figure(result["seconds_per_epoch"]),
        _figure(result["cache_seconds"]),
        f"{result['cache_ram_gb']:.2f}",
        f"{result['peak_ram_gb']:.2f}",
        "-" if result["peak_gpu_gb"] == "" else f"{result['peak_gpu_gb']:.2f}",
    ]


def summary_line(result: dict) -> str:
    """One line to quote for a config."""
    gpu = "" if result["peak_gpu_gb"] == "" else f", peak GPU {result['peak_gpu_gb']:.2f} GB"
    return (
        f"{result['config']} on {result['device']}{' with AMP' if result['amp'] else ''}: "
        f"{_figure(result['iterations_per_second'])} it/s, {_figure(result['seconds_per_epoch'])} s per epoch of "
        f"{result['cases']} cases, peak RAM {result['peak_ram_gb']:.2f} GB{gpu}"
    )


def _device_overrides(device: str | None) -> dict:
    if device is None:
        return {}
    try:
        chosen = torch.device(device)
    except RuntimeError as error:
        raise InputError(f"--device {device}: {error}") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device here")
    return {"device": f"$torch.device('{chosen}')", **({} if chosen.type == "cuda" else {"amp": False})}


def main(
    configs: str = "both",
    num_cases: int = 4,
    iterations: int | None = None,
    warmup_iterations: int = 1,
    dataset_dir: str | None = None,
    device: str | None = None,
    overrides: dict | None = None,
) -> None:
    """Train each of --configs (demo, default or both) on --num_cases cases (written as full-size synthetic cases,
    or the first ones of --dataset_dir) for --warmup_iterations untimed iterations, then --iterations timed ones
    (default: one epoch), and print a table of iterations per second, seconds per epoch, cache time and peak memory.
    --device (default: the config's, the first GPU if any) picks cuda:N or cpu; on a GPU the configs use AMP.
    --overrides: config ids and values for both configs, e.g. '{"crops_per_case": 1, "num_workers": 0}'."""
    with exit_on_input_error():
        problems = []
        if configs not in (*CONFIGS, "both"):
            problems.append(f"--configs must be demo, default or both, not {configs}")
        if num_cases < 2:
            problems.append(f"--num_cases must be at least 2, not {num_cases}")
        if iterations is not None and iterations < 1 or warmup_iterations < 0:
            problems.append("--iterations must be at least 1 and --warmup_iterations at least 0")
        if overrides is not None and not isinstance(overrides, dict):
            problems.append(
                f"--overrides must be a dict of config ids and values, e.g. '{{\"num_workers\": 0}}', not {overrides!r}"
            )
        if problems:
            raise InputError(problems)
        names = list(CONFIGS) if configs == "both" else [configs]
        settings = {**(overrides or {}), **_device_overrides(device)}
        results = []
        source = f"the first {num_cases} cases of {dataset_dir}" if dataset_dir else ""
        with tempfile.TemporaryDirectory(prefix="benchmark_training_") as work:
            if dataset_dir is None:
                dataset_dir = str(Path(work) / "data")
                print(f"writing {num_cases} full-size synthetic cases to a temporary folder", file=sys.stderr)
                generate_dataset(dataset_dir, num_cases, 0, label_scheme=settings.get("label_scheme", DEFAULT_SCHEME))
            datalist = benchmark_datalist(dataset_dir, num_cases, settings.get("label_scheme"))
            write_json_atomic(datalist, Path(work) / "datalist.json")
            settings |= {
                "dataset_dir": str(Path(dataset_dir).absolute()),
                "datalist": str(Path(work) / "datalist.json"),
                "label_scheme": datalist["label_scheme"],
                "fold": 0,
                "val_interval": "$@num_epochs + 1",
            }
            for name in names:
                # A fresh process per config, so that its peak RAM is its own.
                run = {**settings, "output_dir": str(Path(work) / name)}
                try:
                    results.append(in_fresh_process(measure, name, run, iterations, warmup_iterations))
                except BrokenProcessPool:
                    sys.exit(f"error: {name}: its training process was killed (out of memory?); nothing measured")

    shape = "x".join(map(str, BRATS_SHAPE))
    print(
        f"Training on {source or f'{num_cases} full-size synthetic cases ({shape}, 1 mm)'}, "
        f"{warmup_iterations} warm-up iteration(s) untimed, validation off.\n"
        "An epoch is ceil(cases / batch_size) iterations of batch_size x crops_per_case crops; "
        f"s/epoch = iterations per epoch / (it/s), for {num_cases} cases (scale it by your number of training cases).\n"
        "cache_s, cache_RAM_GB: building the training cache, and the resident peak once it is built (before the "
        "network); peak RAM: the training process's resident peak (DataLoader workers share its cache and are not "
        "counted); peak GPU: torch's peak allocation."
    )
    rows = [list(COLUMNS), *(table_row(result) for result in results)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(COLUMNS))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    print("; ".join(summary_line(result) for result in results))


if __name__ == "__main__":
    fire.Fire(main)
