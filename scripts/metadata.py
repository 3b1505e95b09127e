"""The label-scheme-dependent part of configs/metadata.json: what the network and the bundle output.

MONAI Label (0.8.5, ``BundleInferTask``) names the values of the returned label map after the ``channel_def`` of the
first entry of ``network_data_format.outputs``, while the model zoo's ``verify_net_in_out`` compares the
``num_channels`` of ``outputs.pred`` with the network's. So ``outputs.pred`` has the network's channel count (one
sigmoid region per channel, listed in ``region_channels``) and, in ``channel_def``, the names of the label values the
bundle returns; ``post_processed_outputs.pred`` describes that label map. Both follow the label scheme:
``python -m scripts.metadata`` rewrites them for the ``label_scheme`` of configs/inference.yaml (or
``--label_scheme``); run it after changing the scheme of the model served.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fire
from monai.bundle import ConfigParser

from scripts.atomic import write_text_atomic
from scripts.labels import LabelScheme, get_scheme

BUNDLE_ROOT = Path(__file__).parents[1]
METADATA = BUNDLE_ROOT / "configs" / "metadata.json"
INFERENCE_CONFIG = BUNDLE_ROOT / "configs" / "inference.yaml"
BACKGROUND = "background"


def label_channel_def(scheme: LabelScheme) -> dict[str, str]:
    """{"0": "background", "1": "NCR (non-enhancing tumour core)", ...}: every value of the scheme's label map."""
    return {"0": BACKGROUND, **{str(value): name for value, name in sorted(scheme.label_names().items())}}


def output_formats(label_scheme: str | LabelScheme) -> tuple[dict, dict]:
    """(``outputs``, ``post_processed_outputs``) of ``network_data_format`` for a label scheme."""
    scheme = get_scheme(label_scheme)
    regions = {
        str(index): f"{region}: labels {{{', '.join(map(str, sorted(scheme.regions[region])))}}}"
        for index, region in enumerate(scheme.channels)
    }
    outputs = {
        "pred": {
            "type": "image",
            "format": "segmentation",
            "num_channels": len(scheme.channels),
            "spatial_shape": ["64*n", "64*n", "64*n"],
            "dtype": "float32",
            "value_range": [0, 1],
            "is_patch_data": True,
            "channel_def": label_channel_def(scheme),
            "region_channels": regions,
            "description": (
                f"One probability per region channel (region_channels; the network's logits through the inferer's "
                f"sigmoid). channel_def names the values of the label map the bundle returns "
                f"(post_processed_outputs), which MONAI Label reads from here. Label scheme: {scheme.name}."
            ),
        }
    }
    post_processed = {
        "pred": {
            "type": "image",
            "format": "labels",
            "num_channels": 1,
            "spatial_shape": ["*", "*", "*"],
            "dtype": "uint8",
            "value_range": [0, max(scheme.values)],
            "is_patch_data": False,
            "channel_def": label_channel_def(scheme),
            "description": (
                f"Label map of the {scheme.name} scheme ({scheme.title}) on the grid of the input as given: "
                f"regions thresholded at 0.5 and painted in the order {', '.join(r for r, _ in scheme.paint_order)}"
            ),
        }
    }
    return outputs, post_processed


def config_label_scheme(config_file: str | Path = INFERENCE_CONFIG) -> str:
    """The ``label_scheme`` of an inference config, as written there."""
    parser = ConfigParser()
    parser.read_config(str(config_file))
    return parser["label_scheme"]


def with_outputs_of(metadata: dict, label_scheme: str | LabelScheme) -> dict:
    """A copy of `metadata` whose ``network_data_format`` outputs describe `label_scheme`, inputs kept."""
    outputs, post_processed = output_formats(label_scheme)
    network = {**metadata["network_data_format"], "outputs": outputs, "post_processed_outputs": post_processed}
    return {**metadata, "network_data_format": network}


def json_text(content: dict) -> str:
    """JSON as the model zoo's pretty-format check wants it: 4-space indent, keys in their order, ASCII."""
    return json.dumps(content, indent=4) + "\n"


def main(label_scheme: str | None = None, metadata: str | None = None, check: bool = False) -> None:
    """Rewrite METADATA's (default: configs/metadata.json) output description for LABEL_SCHEME (default:
    configs/inference.yaml's); with --check, only say whether it is up to date (exit status 1 if not)."""
    scheme = get_scheme(label_scheme or config_label_scheme())
    metadata = metadata or str(METADATA)
    text = Path(metadata).read_text(encoding="utf-8")
    expected = json_text(with_outputs_of(json.loads(text), scheme))
    if check:
        if text != expected:
            sys.exit(f"{metadata}: outputs do not describe label_scheme {scheme.name}: run python -m scripts.metadata")
        print(f"{metadata}: up to date for {scheme.name}")
        return
    write_text_atomic(metadata, expected)
    print(f"{metadata}: outputs describe label_scheme {scheme.name}")


if __name__ == "__main__":
    fire.Fire(main)
