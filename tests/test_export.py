"""Export of the network to ONNX (`monai.bundle onnx_export`) on the tiny Swin UNETR; the TorchScript export and the
model card's input/output description are checked with the rest of the model zoo's checks (test_model_zoo.py)."""

from __future__ import annotations

import numpy as np
import onnxruntime
from monai.bundle import onnx_export

from tests.conftest import EXPORT_INPUT_SHAPE, EXPORT_TOLERANCE, INFERENCE_CONFIG, METADATA, TINY_FEATURE_SIZE


def test_onnx_export_matches_pytorch_in_onnxruntime(tiny_swin_checkpoint, export_reference, tmp_path):
    """The TorchScript-based exporter (`dynamo: False`, via `use_trace`): about 4x faster here than
    torch's default dynamo exporter, which also works, with the same outputs."""
    onnx_export(
        net_id="network_def",
        filepath=str(tmp_path / "model.onnx"),
        ckpt_file=str(tiny_swin_checkpoint),
        meta_file=METADATA,
        config_file=INFERENCE_CONFIG,
        use_trace=True,
        input_shape=EXPORT_INPUT_SHAPE,
        converter_kwargs={"dynamo": False},
        feature_size=TINY_FEATURE_SIZE,
    )
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    image, expected = export_reference
    (output,) = session.run(None, {session.get_inputs()[0].name: image.numpy()})
    np.testing.assert_allclose(output, expected.numpy(), **EXPORT_TOLERANCE)
