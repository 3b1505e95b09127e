"""Export of the network to TorchScript (`monai.bundle ckpt_export`) and ONNX (`monai.bundle onnx_export`),
and the model card's input/output description (`monai.bundle verify_net_in_out`), on the tiny Swin UNETR."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from monai.bundle import ConfigParser, onnx_export, verify_net_in_out

from scripts.checkpoints import load_network_weights
from tests.conftest import INFERENCE_CONFIG, METADATA, TINY_FEATURE_SIZE

BUNDLE_ROOT = Path(__file__).parents[1]
# One sliding window of sw_batch_size 1 at the tiny roi: exported models have fixed shapes.
INPUT_SHAPE = [1, 4, 64, 64, 64]
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(scope="module")
def reference(tiny_swin_checkpoint) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of the PyTorch network that inference.yaml defines, with the tiny checkpoint."""
    parser = ConfigParser()
    parser.read_config(INFERENCE_CONFIG)
    parser["feature_size"] = TINY_FEATURE_SIZE
    network = load_network_weights(parser.get_parsed_content("network_def"), tiny_swin_checkpoint).eval()
    image = torch.rand(INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return image, network(image)


def test_torchscript_export_command_line_matches_pytorch(tiny_swin_checkpoint, reference, tmp_path):
    """The documented command; `check_trace` off because tracing twice to compare costs 4x the time,
    and this test compares the outputs itself."""
    command = [
        *(sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def"),
        *("--filepath", str(tmp_path / "model.ts"), "--ckpt_file", str(tiny_swin_checkpoint)),
        *("--meta_file", METADATA, "--config_file", INFERENCE_CONFIG),
        *("--use_trace", "True", "--input_shape", str(INPUT_SHAPE), "--converter_kwargs", "{'check_trace': False}"),
        *("--feature_size", str(TINY_FEATURE_SIZE)),
    ]
    result = subprocess.run(command, cwd=BUNDLE_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]

    extra_files = {"metadata.json": "", "inference.json": ""}
    model = torch.jit.load(tmp_path / "model.ts", _extra_files=extra_files)
    image, expected = reference
    with torch.no_grad():
        torch.testing.assert_close(model(image), expected, **TOLERANCE)
    with open(METADATA) as file:
        assert json.loads(extra_files["metadata.json"])["version"] == json.load(file)["version"]
    assert json.loads(extra_files["inference.json"])["network_def"]["_target_"] == "SwinUNETR"


def test_onnx_export_matches_pytorch_in_onnxruntime(tiny_swin_checkpoint, reference, tmp_path):
    """The TorchScript-based exporter (`dynamo: False`, via `use_trace`): about 4x faster here than
    torch's default dynamo exporter, which also works, with the same outputs."""
    onnx_export(
        net_id="network_def",
        filepath=str(tmp_path / "model.onnx"),
        ckpt_file=str(tiny_swin_checkpoint),
        meta_file=METADATA,
        config_file=INFERENCE_CONFIG,
        use_trace=True,
        input_shape=INPUT_SHAPE,
        converter_kwargs={"dynamo": False},
        feature_size=TINY_FEATURE_SIZE,
    )
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    image, expected = reference
    (output,) = session.run(None, {session.get_inputs()[0].name: image.numpy()})
    np.testing.assert_allclose(output, expected.numpy(), **TOLERANCE)


def test_metadata_describes_the_network_inputs_and_outputs():
    """Channels and dtypes of configs/metadata.json against the network; n=2 makes "32*n" the tiny roi."""
    verify_net_in_out(
        net_id="network_def",
        meta_file=METADATA,
        config_file=INFERENCE_CONFIG,
        device="cpu",
        n=2,
        feature_size=TINY_FEATURE_SIZE,
    )
