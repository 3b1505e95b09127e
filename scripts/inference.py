"""Batch prediction of BraTS cases into submission-ready 2023 label maps.

`CasePredictor` runs a config's preprocessing, inferer and postprocessing case by case: a bad case
(missing, truncated or mismatched files; NaN, Inf or all-zero volumes) is reported (case, file, reason)
and skipped, every output is written atomically on exactly the grid and header of the case's t1c file
(or of its stacked 4-channel file, scripts.stack_modalities), finished cases are skipped when a run is
repeated, and what a killed run left half-written is removed. Under torchrun (configs/multi_gpu_inference.yaml)
each process predicts every N-th case and the summary and exit status cover them all.
`EnsembleInferer` averages sigmoid probabilities over checkpoints and mirrored inputs.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path

import ignite.distributed as idist
import nibabel as nib
import numpy as np
import torch
from monai.inferers import Inferer
from monai.utils import convert_to_numpy
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from scripts.atomic import atomic_output, remove_stale_temporaries, write_text_atomic
from scripts.cases import (
    case_files,
    case_id_from_path,
    check_case,
    stacked_case,
    stacked_case_files,
    survey_folders,
)
from scripts.errors import InputError, problem_lines
from scripts.prepare_datalist import load_json
from scripts.resources import peak_memory

logger = logging.getLogger(__name__)


def cases_in_folder(dataset_dir: str | Path) -> list[dict]:
    """Every case folder under `dataset_dir` (BraTS layout) and every stacked case file directly in it, as
    {"case", "image"} dicts; InputError when there is none, listing why each folder found is not a case."""
    case_dirs, folder_problems = survey_folders(dataset_dir)
    stacked = stacked_case_files(dataset_dir)
    if not case_dirs and not stacked:
        expected = "<case>/<case>-t1c.nii.gz, -t1n, -t2f, -t2w, or <case>.nii.gz with these four as channels"
        raise InputError([f"no cases in {dataset_dir}: expected {expected}", *folder_problems])
    for problem in folder_problems:
        logger.warning(f"not a case, left out: {problem}")
    return [{"case": case["case"], "image": case["image"]} for case in map(case_files, case_dirs)] + [
        {"case": case["case"], "image": case["image"], "stacked": True} for case in map(stacked_case, stacked)
    ]


def cases_in_datalist(datalist: str | Path, dataset_dir: str | Path, key: str = "testing") -> list[dict]:
    """The `key` list of a datalist (paths relative to `dataset_dir`), as {"case", "image"} dicts."""
    entries = load_json(datalist).get(key)
    if not entries:
        raise InputError(f"datalist {datalist} has no cases in a '{key}' list")
    cases = []
    for entry in entries:
        image = [os.path.abspath(os.path.join(dataset_dir, path)) for path in entry["image"]]
        cases.append({"case": case_id_from_path(image[0]), "image": image})
    return cases


def write_label_like(label: np.ndarray, reference: str | Path, output: str | Path) -> None:
    """Write a uint8 label map with the reference volume's shape (the spatial shape of a stacked one), affine, qform
    and sform, atomically: the file appears complete under its final name or not at all."""
    reference_image = nib.load(reference)
    if label.shape != reference_image.shape[:3]:
        raise ValueError(f"label shape {label.shape} differs from {reference} {reference_image.shape[:3]}")
    header = reference_image.header.copy()
    header.set_data_dtype(np.uint8)
    image = nib.Nifti1Image(label.astype(np.uint8), reference_image.affine, header)
    image.set_qform(reference_image.get_qform(), code=int(reference_image.header["qform_code"]))
    image.set_sform(reference_image.get_sform(), code=int(reference_image.header["sform_code"]))
    image.header.set_slope_inter(1.0, 0.0)
    with atomic_output(output, suffix=".nii.gz") as temporary:
        nib.save(image, temporary)


def write_probabilities(
    probabilities: np.ndarray, regions: Sequence[str], reference: str | Path, output: str | Path
) -> None:
    """Save region probabilities (regions first, then the reference volume's grid) as float16 in a compressed
    ``.npz`` (keys ``probabilities``, ``regions``, ``affine``: the reference's), atomically. NIfTI has no float16,
    and nnU-Net saves its probabilities the same way, which eases ensembling with it."""
    reference_image = nib.load(reference)
    if probabilities.shape[1:] != reference_image.shape[:3]:
        raise ValueError(
            f"probabilities of shape {probabilities.shape[1:]} differ from {reference} {reference_image.shape[:3]}"
        )
    with atomic_output(output, suffix=".npz") as temporary, open(temporary, "wb") as file:
        np.savez_compressed(
            file,
            probabilities=probabilities.astype(np.float16),
            regions=np.array(list(regions)),
            affine=reference_image.affine,
        )


def case_problem_lines(case: dict, error: BaseException) -> list[str]:
    """The problem lines of `error`, each starting with the case id."""
    return [
        line if line.startswith(f"{case['case']}: ") else f"{case['case']}: {line}" for line in problem_lines(error)
    ]


class _Prepared(Dataset):
    """The cases, each as `prepare` gives it, for a DataLoader's workers."""

    def __init__(self, cases: list[dict], prepare: Callable):
        self.cases = cases
        self.prepare = prepare

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> tuple[dict, dict | None, list[str]]:
        return self.prepare(self.cases[index])


def _as_is(item):
    return item


class EnsembleInferer(Inferer):
    """Mean sigmoid probability of `inferer` over `networks` (or the network passed in) and over
    every combination of flips along `mirror_axes` (spatial axes 0-2), as nnU-Net's mirror TTA."""

    def __init__(self, inferer: Inferer, networks: Sequence[torch.nn.Module] = (), mirror_axes: Sequence[int] = ()):
        super().__init__()
        if any(axis not in (0, 1, 2) for axis in mirror_axes):
            raise ValueError(f"mirror_axes are spatial axes among 0, 1, 2, got {list(mirror_axes)}")
        self.inferer = inferer
        self.networks = list(networks)
        axes = sorted({axis + 2 for axis in mirror_axes})  # batch and channel come first
        self.flips = [list(dims) for n in range(len(axes) + 1) for dims in itertools.combinations(axes, n)]

    def __call__(self, inputs: torch.Tensor, network: Callable | None = None, *args, **kwargs) -> torch.Tensor:
        networks = self.networks or [network]
        total = None
        for net in networks:
            for dims in self.flips:
                flipped = torch.flip(inputs, dims) if dims else inputs
                probability = torch.sigmoid(self.inferer(flipped, net, *args, **kwargs))
                probability = torch.flip(probability, dims) if dims else probability
                total = probability if total is None else total + probability
        return total / (len(networks) * len(self.flips))


class CasePredictor:
    """Predict each case into `<output_dir>/<case>.nii.gz`; see the module docstring."""

    def __init__(
        self,
        cases: Sequence[dict],
        preprocessing: Callable,
        inferer: Callable,
        network: torch.nn.Module,
        postprocessing: Callable,
        output_dir: str | Path,
        device: str | torch.device = "cpu",
        overwrite: bool = False,
        amp: bool = False,
        summary_path: str | Path | None = None,
        probabilities_dir: str | Path | None = None,
        regions: Sequence[str] = (),
        num_workers: int = 0,
    ):
        self.cases = list(cases)
        self.preprocessing = preprocessing
        self.inferer = inferer
        self.network = network
        self.postprocessing = postprocessing
        self.output_dir = Path(output_dir)
        self.device = torch.device(device)
        self.overwrite = overwrite
        self.amp = amp and self.device.type == "cuda"
        self.summary_path = Path(summary_path) if summary_path is not None else None
        self.probabilities_dir = Path(probabilities_dir) if probabilities_dir is not None else None
        self.regions = list(regions)
        self.num_workers = num_workers

    def output_path(self, case: dict) -> Path:
        return self.output_dir / f"{case['case']}.nii.gz"

    def probabilities_path(self, case: dict) -> Path | None:
        return self.probabilities_dir / f"{case['case']}.npz" if self.probabilities_dir is not None else None

    def is_done(self, case: dict) -> bool:
        probabilities = self.probabilities_path(case)
        return self.output_path(case).exists() and (probabilities is None or probabilities.exists())

    def prepare(self, case: dict) -> tuple[dict, dict | None, list[str]]:
        """(case, its preprocessed data or None, its problems): the headers checked, then the voxels as the
        preprocessing loads them (LoadCaseImaged). Never raises, so that a bad case cannot stop a loader worker."""
        problems = check_case({**case, "label": None}, check_data=False)
        if problems:
            return case, None, problems
        try:
            return case, self.preprocessing({"image": case["image"]}), []
        except Exception as error:
            return case, None, case_problem_lines(case, error)

    def prepared(self, cases: list[dict]) -> Iterable[tuple[dict, dict | None, list[str]]]:
        """`prepare` of each case in order; with `num_workers`, worker processes read and preprocess the next cases
        while the network runs on this one, so that a GPU does not wait for NIfTI decompression."""
        if not self.num_workers:
            return map(self.prepare, cases)
        # batch_size None: one case at a time, as prepared (no collation); one case ahead per worker bounds RAM.
        return DataLoader(
            _Prepared(cases, self.prepare),
            batch_size=None,
            collate_fn=_as_is,
            num_workers=self.num_workers,
            prefetch_factor=1,
        )

    def predict(self, data: dict) -> dict:
        """The post-processing's output for one preprocessed case: ``pred``, the label map on the grid of its input
        files, and ``probabilities`` (the regions' probabilities there) when the post-processing keeps them."""
        autocast = torch.autocast("cuda") if self.amp else nullcontext()
        with torch.no_grad(), autocast:
            pred = self.inferer(data["image"][None].to(self.device), self.network)
        data["pred"] = pred[0].float().cpu()
        return self.postprocessing(data)

    def write(self, case: dict, prediction: dict) -> None:
        """The label map, and the probabilities if asked for, each atomically; the label map last, since a case
        counts as done once it exists."""
        reference = case["image"][0]
        probabilities = self.probabilities_path(case)
        if probabilities is not None:
            if "probabilities" not in prediction:
                raise InputError("probabilities_dir is set, but the post-processing keeps no 'probabilities'")
            write_probabilities(convert_to_numpy(prediction["probabilities"]), self.regions, reference, probabilities)
        write_label_like(convert_to_numpy(prediction["pred"])[0], reference, self.output_path(case))

    def run(self) -> dict:
        """Predict every pending case and return a summary; after the summary, exit with status 1 if any failed.
        Under torchrun every process takes every N-th case (the list is the same on all, so each case falls to
        one) and all of them return the summary of all cases; process 0 exits with status 1 if any case failed."""
        if not self.cases:
            raise InputError("no cases to predict")
        self.network.eval()
        for path in remove_stale_temporaries(self.output_dir):
            logger.warning(f"removed {path.name}, left by an interrupted run")
        rank, world = idist.get_rank(), idist.get_world_size()
        share = self.cases[rank::world]
        pending = [case for case in share if self.overwrite or not self.is_done(case)]
        failures: list[str] = []
        seconds: list[float] = []
        last = time.perf_counter()
        prepared = self.prepared(pending)
        for case, data, problems in tqdm(prepared, total=len(pending), desc="cases", unit="case", disable=rank > 0):
            if not problems:
                try:
                    self.write(case, self.predict(data))
                except Exception as error:  # one bad case must not stop the batch
                    problems = case_problem_lines(case, error)
            now = time.perf_counter()
            if not problems:  # from the previous case to this one: with workers, what waiting for data costs too
                seconds.append(now - last)
            last = now
            for problem in problems:
                logger.error(problem)
            failures += problems
        outcome = (len(share), len(pending), failures, seconds, peak_memory())
        # A gather is also a barrier: once it returns, every process has written its cases.
        outcomes = idist.all_gather(outcome) if world > 1 else [outcome]
        failures = [problem for _, _, rank_failures, _, _ in outcomes for problem in rank_failures]
        seconds = [case_seconds for _, _, _, rank_seconds, _ in outcomes for case_seconds in rank_seconds]
        failed = sorted({problem.split(": ", 1)[0] for problem in failures})
        summary = {
            "written": sum(num_pending for _, num_pending, _, _, _ in outcomes) - len(failed),
            "skipped_existing": sum(num_cases - num_pending for num_cases, num_pending, _, _, _ in outcomes),
            "failed": failed,
            "output_dir": str(self.output_dir),
            # Reading, preprocessing, network, post-processing and writing of a written case.
            "seconds_per_case": round(sum(seconds) / len(seconds), 2) if seconds else None,
            # Of the process that needed most.
            **{key: max(memory[key] for *_, memory in outcomes) for key in ("peak_ram_gb", "peak_gpu_gb")},
        }
        logger.info(
            f"{summary['written']} written, {summary['skipped_existing']} already present (skipped), "
            f"{len(failed)} failed, in {self.output_dir}; {summary['seconds_per_case']} s per case, "
            f"peak RAM {summary['peak_ram_gb']} GB"
        )
        if self.summary_path is not None and rank == 0:
            write_text_atomic(self.summary_path, json.dumps(summary, indent=2) + "\n")
        if failures and rank == 0:
            raise SystemExit("failed cases:\n" + "\n".join(failures))
        return summary
