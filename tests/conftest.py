"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.networks.nets import SwinUNETR

from scripts.prepare_datalist import make_datalist, write_json_atomic
from scripts.synthetic import generate_dataset

SMALL_SHAPE = (64, 64, 40)


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with 6 training + 2 validation synthetic BraTS-PED cases on a small grid, in the challenge
    layout; made once per session and shared, so tests must not modify it."""
    root = tmp_path_factory.mktemp("brats_ped")
    generate_dataset(root, num_train=6, num_val=2, seed=0, shape=SMALL_SHAPE)
    return root


# A tiny Swin UNETR on a coarse grid, so that one epoch on the small synthetic cases takes seconds.
TINY_TRAINING = {
    "spacing": [4.0, 4.0, 4.0],
    "roi_size": [64, 64, 64],
    "feature_size": 12,
    "use_checkpoint": False,
    "crops_per_case": 1,
    "num_workers": 0,
    "sw_batch_size": 1,
    "num_epochs": 1,
    "val_interval": 1,
    "warmup_epochs": 1,
}
TRAIN_CONFIG = str(Path(__file__).parents[1] / "configs" / "train.yaml")


@pytest.fixture(scope="session")
def synthetic_datalist(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-fold datalist of the synthetic dataset (4 training and 2 validation cases per fold)."""
    datalist, problems = make_datalist(synthetic_dataset, num_folds=3, seed=0)
    assert not problems
    path = tmp_path_factory.mktemp("datalist") / "datalist.json"
    write_json_atomic(datalist, path)
    return path


def train_workflow(dataset_dir: Path, datalist: Path, output_dir: Path, **overrides) -> ConfigWorkflow:
    """The training config as `monai.bundle run` would build it, with the tiny settings and `overrides`."""
    settings = {**TINY_TRAINING, "dataset_dir": str(dataset_dir), "datalist": str(datalist)}
    settings.update(output_dir=str(output_dir), **overrides)
    workflow = ConfigWorkflow(config_file=TRAIN_CONFIG, workflow_type="train", **settings)
    workflow.initialize()
    return workflow


@pytest.fixture(scope="session")
def trained_fold(synthetic_dataset: Path, synthetic_datalist: Path, tmp_path_factory: pytest.TempPathFactory):
    """One epoch of fold 0 on the synthetic cases: (finished workflow, its output folder)."""
    output_dir = tmp_path_factory.mktemp("fold0")
    workflow = train_workflow(synthetic_dataset, synthetic_datalist, output_dir, run_id="training")
    workflow.run()
    return workflow, output_dir


# Inference and export: the inference config with a tiny Swin UNETR (roi 64 is the smallest it takes).
INFERENCE_CONFIG = str(Path(__file__).parents[1] / "configs" / "inference.yaml")
METADATA = str(Path(__file__).parents[1] / "configs" / "metadata.json")
TINY_FEATURE_SIZE = 12


@pytest.fixture(scope="session")
def tiny_swin_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """State dict (best-model file format) of a seeded, untrained Swin UNETR as inference.yaml builds it
    with feature_size 12."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        network = SwinUNETR(in_channels=4, out_channels=3, feature_size=TINY_FEATURE_SIZE)
    path = tmp_path_factory.mktemp("tiny_swin") / "model.pt"
    torch.save(network.state_dict(), path)
    return path
