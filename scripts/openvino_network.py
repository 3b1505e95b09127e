"""The network run by OpenVINO on a CPU: inference's `backend: openvino` (docs/inference.md has the measurements).

OpenVINO is optional (``pip install openvino==2026.4.1``, the version the tests use). The torch network is converted
(``torch.export``, then OpenVINO's converter) and compiled for the CPU when the first window of a shape arrives, and
again after its weights change in place (MONAI Label loads another model file into the same module). A converted
model has fixed shapes, so windows of a batch run one at a time through a model of batch 1: a last, smaller batch of
the sliding window then needs no conversion of its own.

With a cache folder, a later process skips both steps: the converted model is kept there as OpenVINO IR
(``<fingerprint>.xml`` and ``.bin``, named by a hash of the weights, the window shape and both versions; the
weights go in place before the ``.xml`` that marks the pair complete), and OpenVINO's own model caching keeps the
compiled model beside it.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from scripts.atomic import atomic_output, remove_stale_temporaries
from scripts.errors import InputError

logger = logging.getLogger(__name__)

OPENVINO_VERSION = "2026.4.1"
# The network's precision (the dtype torch's autocast would run it in; None: fp32) as OpenVINO's inference hint.
PRECISION_HINTS = {None: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def require_openvino() -> None:
    """Raise an InputError that says how to install OpenVINO if it cannot be imported."""
    try:
        import openvino  # noqa: F401
    except ImportError as error:
        raise InputError(
            f"backend: openvino needs the openvino package: pip install openvino=={OPENVINO_VERSION}"
        ) from error


class OpenVINONetwork:
    """Call as the torch `network` on CPU tensors; returns float32 outputs, computed by OpenVINO at `dtype`
    (None: fp32) with `threads` (None: OpenVINO's default, one per core). With `cache_dir`, the converted and the
    compiled models are kept there for later processes (module docstring)."""

    def __init__(
        self,
        network: torch.nn.Module,
        dtype: torch.dtype | None = None,
        threads: int | None = None,
        cache_dir: str | Path | None = None,
    ):
        require_openvino()
        if dtype not in PRECISION_HINTS:
            raise ValueError(f"OpenVINO runs fp32, bf16 or fp16, not {dtype}")
        self.network = network
        self.config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[dtype], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.cache_dir)
            self.config["CACHE_DIR"] = str(self.cache_dir)
        self._weights: tuple | None = None
        self._compiled: dict[tuple[int, ...], object] = {}

    def weights_version(self) -> tuple:
        """Changes whenever a weight is replaced or written in place (load_state_dict copies into the tensors, which
        raises their version counter); reading it costs nothing, where hashing 250 MB of weights per case would."""
        tensors = itertools.chain(self.network.parameters(), self.network.buffers())
        return tuple((tensor.data_ptr(), tensor._version) for tensor in tensors)

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        if windows.device.type != "cpu":
            raise RuntimeError(
                f"backend openvino runs the network on the CPU, but the windows are on {windows.device}: "
                "use backend torch there"
            )
        version = self.weights_version()
        if version != self._weights:
            self._compiled.clear()
            self._weights = version
        shape = (1, *windows.shape[1:])
        if shape not in self._compiled:
            self._compiled[shape] = self._compile(shape)
        compiled = self._compiled[shape]
        batch = np.ascontiguousarray(torch.as_tensor(windows).detach().numpy(), dtype=np.float32)
        # The compiled model returns copies of its output buffers (share_outputs=False).
        return torch.cat([torch.from_numpy(compiled(batch[index : index + 1])[0]) for index in range(len(batch))])

    def fingerprint(self, shape: tuple[int, ...]) -> str:
        """What the converted model depends on: the weights (names, types, shapes, values), the window shape and the
        versions of torch and OpenVINO."""
        import openvino

        digest = hashlib.blake2b(f"{shape} {torch.__version__} {openvino.get_version()}".encode(), digest_size=16)
        for name, tensor in self.network.state_dict().items():
            digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def _compile(self, shape: tuple[int, ...]):
        import openvino

        start = time.perf_counter()
        core = openvino.Core()
        if self.cache_dir is None:
            compiled, done = core.compile_model(self._convert(shape), "CPU", self.config), "converted"
        else:
            # Compiled from the file, also right after converting: OpenVINO's compiled-model cache is keyed by it, and
            # a later run then loads the compiled model without reading the network at all.
            path = self.cache_dir / f"{self.fingerprint(shape)}.xml"
            done = f"read from {path}"
            if not path.is_file():
                self._keep(self._convert(shape), path)
                done = f"converted into {path}"
            try:
                compiled = core.compile_model(str(path), "CPU", self.config)
            except RuntimeError as error:  # damaged since it was written: converted again
                logger.warning(f"OpenVINO could not read {path} ({error}); converting the network again")
                self._keep(self._convert(shape), path)
                compiled, done = core.compile_model(str(path), "CPU", self.config), f"converted into {path}"
        logger.info(
            f"OpenVINO {openvino.get_version()}: network {done} and compiled for windows of {list(shape[2:])} in "
            f"{time.perf_counter() - start:.1f} s ({self.config['INFERENCE_PRECISION_HINT']})"
        )
        return compiled

    def _convert(self, shape: tuple[int, ...]):
        import openvino

        self.network.eval()
        # Traced in fp32 and without gradients, whatever the caller's autocast: OpenVINO applies the precision hint.
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            program = torch.export.export(self.network, (torch.zeros(shape),))
        return openvino.convert_model(program)

    @staticmethod
    def _keep(model, path: Path) -> None:
        """Save `model` as `path` (.xml) and its .bin: the weights in place first, so that an .xml is never without
        them; a run killed meanwhile leaves temporaries that the next one removes."""
        import openvino

        with atomic_output(path, suffix=".xml") as temporary:
            try:
                openvino.save_model(model, temporary, compress_to_fp16=False)  # fp32 weights, as trained
                os.replace(temporary.with_suffix(".bin"), path.with_suffix(".bin"))
            finally:
                temporary.with_suffix(".bin").unlink(missing_ok=True)
