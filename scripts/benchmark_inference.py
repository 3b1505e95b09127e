"""Seconds, peak RAM and agreement of the bundle's inference against a plain reference pipeline, on the same cases
with the same weights.

The bundle runs configs/inference.yaml as it is (plus `--levers`); the reference runs the same config with the
settings of a tutorial-style pipeline (`REFERENCE`: the whole volume, float32, 4 windows per pass), so that the
per-region Dice between their label maps measures what the speed and memory levers change, nothing else. Each
pipeline runs each case in a fresh process: its peak RSS (ru_maxrss) is then that case's alone (loading the weights
included), which resetting the high-water mark in one process (/proc/self/clear_refs) would not give, since memory
the allocator kept from the previous case still counts as resident. Seconds are those of inference's own summary:
reading, preprocessing, network, post-processing and writing of the case.

    python -m scripts.benchmark_inference --checkpoint models/fold0/model.pt [--num_cases 2] [--dataset_dir DIR]
        [--variants '{"128 cube": {"val_roi_size": [128, 128, 128]}}']

--variants: more settings of the bundle, each run on the same cases and compared with the same reference run, so that
what each lever changes (seconds, RAM, agreement) is measured without rerunning the slow reference.

Without --dataset_dir, full-size synthetic cases (240 x 240 x 155, scripts.synthetic) are made in a temporary folder.
Agreement means something only with a trained network: random weights predict no stable tumour.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
from monai.bundle import ConfigParser

from scripts.errors import InputError, exit_on_input_error
from scripts.inference import cases_in_folder
from scripts.labels import get_scheme
from scripts.resources import in_fresh_process
from scripts.synthetic import BRATS_SHAPE, generate_dataset

INFERENCE_CONFIG = str(Path(__file__).parents[1] / "configs" / "inference.yaml")
# A tutorial-style pipeline: the whole volume in windows of the training crop, 4 per pass at overlap 0.5, in float32,
# one thread per core, glibc's malloc as it comes.
REFERENCE = {
    "val_roi_size": "$@roi_size",
    "precision": "fp32",
    "channels_last": False,
    "crop_to_brain": False,
    "sw_batch_size": 4,
    "sw_overlap": 0.5,
    "flash_attention": False,
    "threads": None,
    "return_freed_memory": False,
}


def predict_case(config_file: str, overrides: dict, case: dict, output_dir: str) -> dict:
    """Run inference's own engine on one case (in the calling process) and return its seconds and peak RAM."""
    parser = ConfigParser()
    parser.read_config(config_file)
    parser.update({**overrides, "cases": [case], "output_dir": output_dir, "overwrite": True})
    parser.get_parsed_content("initialize")
    summary = parser.get_parsed_content("evaluator").run()
    return {"seconds": summary["seconds_per_case"], "peak_ram_gb": summary["peak_ram_gb"]}


def region_dice(first: np.ndarray, second: np.ndarray, label_scheme: str) -> dict[str, float]:
    """Dice of each region of the scheme between two label maps; 1.0 where both lack the region."""
    scheme = get_scheme(label_scheme)
    dice = {}
    for region, a, b in zip(
        scheme.channels, scheme.labels_to_regions(first), scheme.labels_to_regions(second), strict=True
    ):
        total = int(a.sum()) + int(b.sum())
        dice[region] = 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total
    return dice


def dice_text(dice: dict[str, float]) -> str:
    return "Dice " + " ".join(f"{region} {value:.4f}" for region, value in dice.items())


def benchmark(
    checkpoint: str,
    cases: list[dict],
    work_dir: Path,
    levers: dict | None = None,
    overrides: dict | None = None,
    config_file: str = INFERENCE_CONFIG,
    variants: dict[str, dict] | None = None,
) -> list[dict]:
    """Both pipelines, and each variant of the bundle, on every case, printing a row per case (and one per variant),
    a line per variant with its mean time, and a last line with both mean times and their ratio; returns the rows,
    each variant's under `variants`."""
    common = {**(overrides or {}), "checkpoints": [str(checkpoint)]}
    pipelines = {"bundle": {**common, **(levers or {})}, "reference": {**common, **REFERENCE}}
    variants = {name: {**common, **settings} for name, settings in (variants or {}).items()}
    label_scheme = ConfigParser.load_config_file(config_file).get("label_scheme")
    label_scheme = common.get("label_scheme", label_scheme)

    def run(name: str, settings: dict, case: dict) -> tuple[dict, np.ndarray]:
        """Seconds and peak RAM of one pipeline on the case, and its label map."""
        output_dir = work_dir / name
        outcome = in_fresh_process(predict_case, config_file, settings, case, str(output_dir))
        return outcome, np.asarray(nib.load(output_dir / f"{case['case']}.nii.gz").dataobj)

    rows = []
    for case in cases:
        row = {"case": case["case"], "variants": {}}
        (row["bundle"], bundle_labels), (row["reference"], reference_labels) = (
            run(name, settings, case) for name, settings in pipelines.items()
        )
        row["dice"] = region_dice(bundle_labels, reference_labels, label_scheme)
        rows.append(row)
        print(
            f"{row['case']}  bundle {row['bundle']['seconds']:.1f} s {row['bundle']['peak_ram_gb']:.2f} GB  "
            f"reference {row['reference']['seconds']:.1f} s {row['reference']['peak_ram_gb']:.2f} GB  "
            + dice_text(row["dice"]),
            flush=True,
        )
        for index, (name, settings) in enumerate(variants.items()):
            outcome, labels = run(f"variant{index}", settings, case)
            outcome["dice"] = region_dice(labels, reference_labels, label_scheme)
            row["variants"][name] = outcome
            resources = f"{outcome['seconds']:.1f} s {outcome['peak_ram_gb']:.2f} GB"
            print(f"  {name}  {resources}  " + dice_text(outcome["dice"]), flush=True)
    for name in variants:
        print(f"{name} {np.mean([row['variants'][name]['seconds'] for row in rows]):.1f} s per case")
    bundle, reference = (np.mean([row[name]["seconds"] for row in rows]) for name in pipelines)
    print(f"bundle {bundle:.1f} s per case, reference {reference:.1f} s per case: {reference / bundle:.2f}x faster")
    return rows


def main(
    checkpoint: str = "models/model.pt",
    num_cases: int = 2,
    dataset_dir: str | None = None,
    levers: dict | None = None,
    overrides: dict | None = None,
    shape: str | tuple = BRATS_SHAPE,
    seed: int = 0,
    variants: dict[str, dict] | None = None,
) -> None:
    """Time the bundle's inference and the reference pipeline on --num_cases cases of --dataset_dir (default: new
    full-size synthetic ones) with --checkpoint. --levers: inference.yaml ids for the bundle only (e.g.
    '{"precision": "fp32"}'); --overrides: ids for both, to describe the network (e.g. the demo's: '{"feature_size":
    12, "spacing": [1.5, 1.5, 1.5], "roi_size": [64, 64, 64]}'); --shape: the synthetic cases' grid; --variants: named
    sets of ids for further runs of the bundle, each compared with the same reference (e.g. '{"fp32": {"precision":
    "fp32"}}')."""
    with exit_on_input_error(), tempfile.TemporaryDirectory(prefix="benchmark_inference_") as work_dir:
        if not Path(checkpoint).is_file():
            raise InputError(f"{checkpoint}: no such checkpoint (pass --checkpoint, a trained model.pt)")
        if dataset_dir is None:
            shape = tuple(int(size) for size in shape)
            dataset_dir = generate_dataset(Path(work_dir) / "cases", 0, num_cases, seed, shape)["validation_dir"]
        cases = cases_in_folder(dataset_dir)[:num_cases]
        benchmark(checkpoint, cases, Path(work_dir), levers, overrides, variants=variants)


if __name__ == "__main__":
    fire.Fire(main)
