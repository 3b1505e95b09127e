"""What the MONAI Model Zoo's CI verifies of a bundle (its ci/verify_bundle.py), run offline on the tiny Swin UNETR:
required and preferred files, large_files.yml, version and changelog, metadata.json against the zoo's schema (a copy
in tests/data, as the zoo's CI downloads it), the network against metadata's input and output description
(`verify_net_in_out` at its default n), and the TorchScript export. The zoo exports by scripting, which Swin UNETR
does not support (the zoo excludes its own Swin UNETR bundle for that): this bundle's export is traced, and its
round trip is checked here. Also that metadata.json is formatted as the zoo's pretty-format check wants it and
describes the label map that configs/inference.yaml's label scheme produces."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out

from scripts.labels import SCHEMES, get_scheme
from scripts.metadata import config_label_scheme, json_text, label_channel_def, with_outputs_of
from tests.conftest import EXPORT_INPUT_SHAPE, EXPORT_TOLERANCE, INFERENCE_CONFIG, METADATA, TINY_FEATURE_SIZE

BUNDLE_ROOT = Path(__file__).parents[1]
SCHEMA = Path(__file__).parent / "data" / "meta_schema_20240725.json"


def read_metadata() -> dict:
    return json.loads(Path(METADATA).read_text(encoding="utf-8"))


def test_required_and_preferred_files_are_present():
    for name in ("LICENSE", "configs/metadata.json", "configs/inference.yaml", "large_files.yml", "docs/README.md"):
        assert (BUNDLE_ROOT / name).is_file(), name


def test_large_files_lists_only_complete_entries_and_no_weights_that_do_not_exist():
    """The zoo downloads every entry (path, url, optional hash) before its checks; no weights are published yet, so
    the list is empty, and the comments say which file a user's training produces and where it goes."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "large_files.yml"))
    entries = parser.get()["large_files"]
    assert all({"path", "url"} <= entry.keys() and entry["url"] for entry in entries)
    assert entries == []
    assert "models/model.pt" in (BUNDLE_ROOT / "large_files.yml").read_text()


def test_version_is_in_the_changelog():
    metadata = read_metadata()
    assert metadata["version"] in metadata["changelog"]


def test_metadata_validates_against_the_zoo_schema(tmp_path):
    """`verify_metadata` as the zoo runs it, the schema given by file (its md5 makes MONAI use it, not download)."""
    pytest.importorskip("jsonschema", reason="jsonschema (requirements-dev.txt) validates metadata")
    md5 = hashlib.md5(SCHEMA.read_bytes()).hexdigest()
    verify_metadata(meta_file=METADATA, filepath=str(SCHEMA), hash_val=md5)
    assert read_metadata()["schema"].endswith("/" + SCHEMA.name)

    broken = read_metadata()
    del broken["authors"]
    broken_file = tmp_path / "metadata.json"
    broken_file.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="authors"):
        verify_metadata(meta_file=str(broken_file), filepath=str(SCHEMA), hash_val=md5)


def test_metadata_names_the_project_monai_label_and_measured_figures_only():
    metadata = read_metadata()
    assert "bundle project" in metadata["authors"]
    assert metadata["supported_apps"] == {"monai-label": "0.8.5"}
    assert "synthetic" in metadata["eval_metrics"]["note"].lower()
    figures = (BUNDLE_ROOT / "docs" / "README.md").read_text()
    for name, regions in metadata["eval_metrics"].items():
        if name != "note":
            assert all(f"{region} {value:.3f}" in figures for region, value in regions.items()), name


@pytest.mark.parametrize("path", [METADATA, str(SCHEMA)])
def test_json_is_formatted_as_the_zoo_pretty_format_check_wants(path):
    text = Path(path).read_text(encoding="utf-8")
    assert text == json.dumps(json.loads(text), indent=4) + "\n"


def test_metadata_outputs_describe_the_label_scheme_of_the_inference_config():
    """`python -m scripts.metadata --check`; MONAI Label names labels from the first output's channel_def."""
    assert json_text(with_outputs_of(read_metadata(), config_label_scheme())) == Path(METADATA).read_text()
    result = subprocess.run(
        [sys.executable, "-m", "scripts.metadata", "--check"], cwd=BUNDLE_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def monai_label_names(metadata: dict) -> dict[str, int]:
    """The label names MONAI Label 0.8.5's BundleInferTask shows: the first output's channel_def, lower-cased,
    background left out."""
    _, first_output = next(iter(metadata["network_data_format"]["outputs"].items()))
    return {name.lower(): int(value) for value, name in first_output["channel_def"].items() if name != "background"}


def test_monai_label_shows_the_names_of_the_label_map_values():
    assert monai_label_names(read_metadata()) == {
        "ncr (non-enhancing tumour core)": 1,
        "ed (peritumoral edema)": 2,
        "et (enhancing tumour)": 3,
    }
    brats2024 = with_outputs_of(read_metadata(), "brats2024_ped")
    assert {name.split()[0]: value for name, value in monai_label_names(brats2024).items()} == {
        "et": 1,
        "net": 2,
        "cc": 3,
        "ed": 4,
    }
    post_processed = brats2024["network_data_format"]["post_processed_outputs"]["pred"]
    assert post_processed["value_range"] == [0, 4] and post_processed["dtype"] == "uint8"


def test_metadata_lists_every_schemes_label_names_as_the_schemes_define_them():
    listed = read_metadata()["label_schemes"]
    assert listed.keys() == SCHEMES.keys()
    for name, scheme in SCHEMES.items():
        assert {"0": "background", **listed[name]["labels"]} == label_channel_def(scheme)


@pytest.mark.parametrize("label_scheme", ["brats2023_ped", "brats2024_ped"])
def test_network_matches_the_metadata_at_the_zoo_default_n(label_scheme, tmp_path):
    """`verify_net_in_out` as the zoo calls it (n=1: 64^3; at 32^3 Swin UNETR's bottleneck is one voxel), with the
    metadata that `scripts.metadata` writes for the scheme; feature_size only makes it faster."""
    meta_file = tmp_path / "metadata.json"
    meta_file.write_text(json_text(with_outputs_of(read_metadata(), label_scheme)))
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(meta_file),
        config_file=INFERENCE_CONFIG,
        bundle_root=str(BUNDLE_ROOT),
        device="cpu",
        feature_size=TINY_FEATURE_SIZE,
        label_scheme=label_scheme,
    )
    outputs = json.loads(meta_file.read_text())["network_data_format"]["outputs"]["pred"]
    assert outputs["num_channels"] == len(get_scheme(label_scheme).channels)


def test_the_zoos_scripted_export_fails_for_swin_unetr(tiny_swin_checkpoint, tmp_path):
    """Why the docs say to trace: the zoo's default `ckpt_export` scripts the network, which Swin UNETR refuses."""
    with pytest.raises(Exception, match="variable number of arguments"):
        ckpt_export(
            net_id="network_def",
            filepath=str(tmp_path / "model.ts"),
            ckpt_file=str(tiny_swin_checkpoint),
            meta_file=METADATA,
            config_file=INFERENCE_CONFIG,
            feature_size=TINY_FEATURE_SIZE,
        )


def test_traced_torchscript_export_round_trip(tiny_swin_checkpoint, export_reference, tmp_path):
    """The documented command; the zoo then loads the file with torch.jit.load. `check_trace` off because tracing
    twice to compare costs 4x the time, and this test compares the outputs itself."""
    command = [
        *(sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def"),
        *("--filepath", str(tmp_path / "model.ts"), "--ckpt_file", str(tiny_swin_checkpoint)),
        *("--meta_file", METADATA, "--config_file", INFERENCE_CONFIG),
        *("--use_trace", "True", "--input_shape", str(EXPORT_INPUT_SHAPE)),
        *("--converter_kwargs", "{'check_trace': False}", "--feature_size", str(TINY_FEATURE_SIZE)),
    ]
    result = subprocess.run(command, cwd=BUNDLE_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]

    extra_files = {"metadata.json": "", "inference.json": ""}
    model = torch.jit.load(tmp_path / "model.ts", _extra_files=extra_files)
    image, expected = export_reference
    with torch.no_grad():
        torch.testing.assert_close(model(image), expected, **EXPORT_TOLERANCE)
    assert json.loads(extra_files["metadata.json"])["version"] == read_metadata()["version"]
    assert json.loads(extra_files["inference.json"])["network_def"]["_target_"] == "SwinUNETR"


def test_monai_label_requirements_keep_the_bundles_torch_and_monai():
    def pins(name: str) -> dict[str, str]:
        lines = (BUNDLE_ROOT / name).read_text().splitlines()
        return dict(line.split("==") for line in lines if line.startswith(("torch==", "monai==")))

    assert pins("requirements-monailabel.txt") == pins("requirements.txt")
