"""Batch prediction of BraTS cases into submission-ready 2023 label maps.

`CasePredictor` runs a config's preprocessing, inferer and postprocessing case by case: a bad case
(missing, truncated or mismatched files; NaN, Inf or all-zero volumes) is reported (case, file, reason)
and skipped, every output is written atomically on exactly the grid and header of the case's t1c file
(or of its stacked 4-channel file, scripts.stack_modalities), finished cases are skipped when a run is
repeated, and what a killed run left half-written is removed. Under torchrun (configs/multi_gpu_inference.yaml)
each process predicts every N-th case and the summary and exit status cover them all. Cases are the iterations of
an ignite Engine, so MONAI's handlers attach to it (`python -m monai.bundle run ... --tracking mlflow` adds an
MLFlowHandler to `val_handlers`); the summary's numbers are its `state.metrics`.
`EnsembleInferer` averages sigmoid probabilities over checkpoints and mirrored inputs.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import ignite.distributed as idist
import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.inferers import Inferer
from monai.networks.nets.swin_unetr import WindowAttention
from monai.utils import convert_to_numpy
from torch.utils.data import DataLoader, Dataset

from scripts.atomic import atomic_output, remove_stale_temporaries, write_text_atomic
from scripts.cases import (
    case_files,
    case_id_from_path,
    check_case,
    stacked_case,
    stacked_case_files,
    survey_folders,
)
from scripts.errors import InputError, debugging, problem_lines
from scripts.openvino_network import OpenVINONetwork, require_openvino
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
    """The problem lines of `error`, each starting with the case id; when debugging (`--debug true`), the error's
    traceback is logged too."""
    if debugging():
        logger.error(f"{case['case']}: traceback of the problem below", exc_info=error)
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


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BACKENDS = ("torch", "openvino")


def _attention_in_chunks(attention: WindowAttention, windows: int, x: torch.Tensor, mask: torch.Tensor | None):
    """`attention`'s own forward over at most `windows` of the windows of each image at a time (see
    `chunk_window_attention`); with gradients, all at once as MONAI does."""
    whole = attention._forward_all_windows
    batch_windows, tokens, channels = x.shape
    per_image = mask.shape[0] if mask is not None else batch_windows
    if torch.is_grad_enabled() or per_image <= windows:
        return whole(x, mask)
    # Windows are ordered image by image; a chunk takes the same windows of every image, and their mask rows.
    x = x.view(batch_windows // per_image, per_image, tokens, channels)
    chunks = [
        whole(
            x[:, start : start + windows].reshape(-1, tokens, channels),
            None if mask is None else mask[start : start + windows],
        )
        for start in range(0, per_image, windows)
    ]
    return torch.cat([chunk.view(x.shape[0], -1, tokens, channels) for chunk in chunks], dim=1).view(
        batch_windows, tokens, channels
    )


def chunk_window_attention(network: torch.nn.Module, windows: int | None) -> torch.nn.Module:
    """Make every Swin window attention of `network` run without gradients over at most `windows` windows at a time;
    None: all at once. The output is the same to the bit; the weights and their names are untouched.

    Why: MONAI 1.6.1's WindowAttention adds the relative position bias to the shifted-window mask for all windows at
    once, a float32 (windows, heads, 343, 343) tensor that is then copied to the attention dtype: 1.4 GB and its copy
    for the first stage of one 128³ window of Swin UNETR at feature size 48 (1000 windows, 3 heads). Chunks of 64
    windows cut that window's peak RSS from 3.9 to 2.6 GB (docs/inference.md). Repeated calls only change the
    chunk size."""
    for module in network.modules():
        if isinstance(module, WindowAttention):
            if not hasattr(module, "_forward_all_windows"):
                module._forward_all_windows = module.forward
            module.forward = (
                module._forward_all_windows
                if windows is None
                else functools.partial(_attention_in_chunks, module, windows)
            )
    return network


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): only there do oneDNN's bf16 kernels beat
    fp32; elsewhere bf16 is emulated and slower. torch has no public query for it (2.13)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def autocast_dtype(precision: str, device_type: str, native_bf16: bool | None = None) -> torch.dtype | None:
    """The dtype the network runs in under autocast for `precision` on a `device_type` ("cpu", "cuda") device, or
    None for plain fp32. "auto": fp16 on CUDA, bf16 on a CPU that has it natively (`native_bf16`, else asked of
    this CPU), fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision is one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if device_type == "cuda":
            return torch.float16
        native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
        return torch.bfloat16 if device_type == "cpu" and native else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class EnsembleInferer(Inferer):
    """Mean sigmoid probability of `inferer` over `networks` (or the network passed in) and over
    every combination of flips along `mirror_axes` (spatial axes 0-2), as nnU-Net's mirror TTA.
    The network runs at `precision` (autocast; see `autocast_dtype`) and, with `channels_last`, on channels-last
    tensors (oneDNN's faster 3D convolutions on a CPU); probabilities and their blending stay float32. Swin window
    attention runs over at most `attention_windows` windows at a time (`chunk_window_attention`).
    `backend` "openvino" runs each network in OpenVINO on the CPU instead, at the same precision, with `threads`
    and `openvino_cache_dir` (scripts.openvino_network); channels_last and attention_windows are torch's levers."""

    def __init__(
        self,
        inferer: Inferer,
        networks: Sequence[torch.nn.Module] = (),
        mirror_axes: Sequence[int] = (),
        precision: str = "fp32",
        channels_last: bool = False,
        attention_windows: int | None = None,
        backend: str = "torch",
        threads: int | None = None,
        openvino_cache_dir: str | Path | None = None,
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend is one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == "openvino":
            require_openvino()  # before the first case
        if any(axis not in (0, 1, 2) for axis in mirror_axes):
            raise ValueError(f"mirror_axes are spatial axes among 0, 1, 2, got {list(mirror_axes)}")
        autocast_dtype(precision, "cpu", native_bf16=False)  # an unknown precision fails here, not at the first case
        self.inferer = inferer
        self.networks = list(networks)
        self.precision = precision
        self.channels_last = channels_last
        self.attention_windows = attention_windows
        self.backend = backend
        self.threads = threads
        self.openvino_cache_dir = openvino_cache_dir
        # The OpenVINO model of each network of the last call, kept for the next case.
        self._openvino: dict[Callable, OpenVINONetwork] = {}
        axes = sorted({axis + 2 for axis in mirror_axes})  # batch and channel come first
        self.flips = [list(dims) for n in range(len(axes) + 1) for dims in itertools.combinations(axes, n)]

    def _at_precision(self, network: Callable, device_type: str) -> Callable:
        """`network` run at this inferer's precision and memory format (or by OpenVINO), returning float32."""
        dtype = autocast_dtype(self.precision, device_type)
        if self.backend == "openvino":
            return self._openvino.get(network) or OpenVINONetwork(network, dtype, self.threads, self.openvino_cache_dir)
        if isinstance(network, torch.nn.Module):
            chunk_window_attention(network, self.attention_windows)

        # The window alone goes channels-last: convolutions follow their input's layout, and the network (maybe a
        # 2D one run slice by slice, or MONAI Label's own) is left as it is.
        def run(window: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if self.channels_last:
                window = window.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
                return network(window, *args, **kwargs).float().contiguous()

        return run

    def __call__(self, inputs: torch.Tensor, network: Callable | None = None, *args, **kwargs) -> torch.Tensor:
        runs = {net: self._at_precision(net, inputs.device.type) for net in self.networks or [network]}
        if self.backend == "openvino":  # only these: a network handed in before (MONAI Label's last) is let go
            self._openvino = runs
        total = None
        for run in runs.values():
            for dims in self.flips:
                flipped = torch.flip(inputs, dims) if dims else inputs
                probability = torch.sigmoid(self.inferer(flipped, run, *args, **kwargs))
                probability = torch.flip(probability, dims) if dims else probability
                total = probability if total is None else total + probability
        return total / (len(runs) * len(self.flips))


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
        summary_path: str | Path | None = None,
        probabilities_dir: str | Path | None = None,
        regions: Sequence[str] = (),
        num_workers: int = 0,
        val_handlers: Sequence = (),
        score: Callable[[], dict] | None = None,
        settings: dict | None = None,
    ):
        self.cases = list(cases)
        self.preprocessing = preprocessing
        self.inferer = inferer
        self.network = network
        self.postprocessing = postprocessing
        self.output_dir = Path(output_dir)
        self.device = torch.device(device)
        self.overwrite = overwrite
        self.summary_path = Path(summary_path) if summary_path is not None else None
        self.probabilities_dir = Path(probabilities_dir) if probabilities_dir is not None else None
        self.regions = list(regions)
        self.num_workers = num_workers
        self.val_handlers = list(val_handlers)
        self.score = score
        self.settings = dict(settings or {})
        self.scores: dict | None = None

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
        with torch.no_grad():
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
        Each case is an iteration of an ignite Engine that runs `val_handlers`; at the end of its epoch, once every
        case is written, the summary's numbers are in `state.metrics` and, if none failed, so are those of
        `score()` (keys joined with "/"), which `scores` keeps. Under torchrun every process takes every N-th case
        (the list is the same on all, so each case falls to one) and all of them return the summary of all cases;
        process 0 exits with status 1 if any case failed."""
        if not self.cases:
            raise InputError("no cases to predict")
        self.network.eval()
        for path in remove_stale_temporaries(self.output_dir):
            logger.warning(f"removed {path.name}, left by an interrupted run")
        rank, world = idist.get_rank(), idist.get_world_size()
        share = self.cases[rank::world]
        done = [case for case in share if not self.overwrite and self.is_done(case)]
        pending = [case for case in share if case not in done]
        engine = Engine(self._predict_case)
        engine.state.num_cases, engine.state.failures, engine.state.seconds = len(share), [], []
        engine.add_event_handler(Events.STARTED, self._start_clock)
        if rank == 0:
            ProgressBar(persist=True, desc="cases", unit="case").attach(engine)
        # Before the handlers' own, so that they find the summary in state.metrics.
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._summarize, len(pending))
        for handler in self.val_handlers:
            handler.attach(engine)
        # An already written case is an iteration too (problems None: skipped), so that a rerun is tracked as well.
        items = itertools.chain(((case, None, None) for case in done), self.prepared(pending))
        if share:
            engine.run(items, max_epochs=1, epoch_length=len(share))
        else:  # more processes than cases: this one only takes part in the gathering
            self._summarize(engine, 0)
        summary = engine.state.summary
        if self.summary_path is not None and rank == 0:
            write_text_atomic(self.summary_path, json.dumps(summary, indent=2) + "\n")
        if engine.state.all_failures and rank == 0:
            raise SystemExit("failed cases:\n" + "\n".join(engine.state.all_failures))
        return summary

    @staticmethod
    def _start_clock(engine: Engine) -> None:
        engine.state.clock = time.perf_counter()

    def _predict_case(self, engine: Engine, item: tuple[dict, dict | None, list[str] | None]) -> dict:
        """One iteration: the case written, or its problems logged; problems None: already written, skipped.
        Returns {"case", "problems", "seconds"}: from the previous case to this one (with workers, what waiting for
        data costs too), None unless written."""
        case, data, problems = item
        if problems is None:
            engine.state.clock = time.perf_counter()
            return {"case": case["case"], "problems": [], "seconds": None}
        if not problems:
            try:
                self.write(case, self.predict(data))
            except Exception as error:  # one bad case must not stop the batch
                problems = case_problem_lines(case, error)
        now = time.perf_counter()
        seconds = None if problems else now - engine.state.clock
        engine.state.clock = now
        for problem in problems:
            logger.error(problem)
        engine.state.failures += problems
        engine.state.seconds += [seconds] if seconds is not None else []
        return {"case": case["case"], "problems": problems, "seconds": seconds}

    def _summarize(self, engine: Engine, num_pending: int) -> None:
        """The summary of every process's cases into `state.summary` and its numbers into `state.metrics`; then,
        if no case failed, `score()`'s."""
        outcome = (engine.state.num_cases, num_pending, engine.state.failures, engine.state.seconds, peak_memory())
        # A gather is also a barrier: once it returns, every process has written its cases.
        outcomes = idist.all_gather(outcome) if idist.get_world_size() > 1 else [outcome]
        failures = [problem for _, _, rank_failures, _, _ in outcomes for problem in rank_failures]
        seconds = [case_seconds for _, _, _, rank_seconds, _ in outcomes for case_seconds in rank_seconds]
        failed = sorted({problem.split(": ", 1)[0] for problem in failures})
        summary = {
            "written": sum(pending for _, pending, _, _, _ in outcomes) - len(failed),
            "skipped_existing": sum(num_cases - pending for num_cases, pending, _, _, _ in outcomes),
            "failed": failed,
            "output_dir": str(self.output_dir),
            # What the run was asked to do beyond the network (e.g. evaluation's post-processing), for later readers.
            **({"settings": self.settings} if self.settings else {}),
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
        engine.state.summary, engine.state.all_failures = summary, failures
        counts = {"cases_written": summary["written"], "cases_skipped_existing": summary["skipped_existing"]}
        resources = {key: summary[key] for key in ("seconds_per_case", "peak_ram_gb", "peak_gpu_gb")}
        engine.state.metrics.update(numbers({**counts, "cases_failed": len(failed), **resources}))
        if self.score is not None and not failures:
            self.scores = self.score()
            engine.state.metrics.update(numbers(self.scores))


def numbers(values: dict, prefix: str = "") -> dict[str, float]:
    """The numbers (not None) in a nested dict, each keyed by its path joined with "/", which MLflow groups by;
    MONAI's flatten_dict would keep only the last key, and a region's metrics would overwrite another's."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat
