"""The network run by OpenVINO on a CPU: inference's `backend: openvino` (docs/inference.md has the measurements).

OpenVINO is optional (``pip install openvino==2026.4.1``, the version the tests use). The torch network is converted
(``torch.export``, then OpenVINO's converter) and compiled for the CPU when the first window of a shape arrives, and
again after its weights change in place (MONAI Label loads another model file into the same module). A converted
model has fixed shapes, so windows of a batch run one at a time through a model of batch 1: a last, smaller batch of
the sliding window then needs no conversion of its own.
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path

import numpy as np
import torch

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
    (None: fp32) with `threads` (None: OpenVINO's default, one per core). With `cache_dir`, OpenVINO keeps each
    compiled model there and a later process loads it instead of compiling again (its model caching)."""

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
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            self.config["CACHE_DIR"] = str(cache_dir)
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

    def _compile(self, shape: tuple[int, ...]):
        import openvino

        start = time.perf_counter()
        self.network.eval()
        # Traced in fp32 and without gradients, whatever the caller's autocast: OpenVINO applies the precision hint.
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            program = torch.export.export(self.network, (torch.zeros(shape),))
        model = openvino.convert_model(program)
        compiled = openvino.Core().compile_model(model, "CPU", self.config)
        logger.info(
            f"OpenVINO {openvino.get_version()}: network converted and compiled for windows of "
            f"{list(shape[2:])} in {time.perf_counter() - start:.1f} s ({self.config['INFERENCE_PRECISION_HINT']})"
        )
        return compiled
