"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.synthetic import generate_dataset

SMALL_SHAPE = (64, 64, 40)


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with 6 training + 2 validation synthetic BraTS-PED cases on a small grid, in the challenge
    layout; made once per session and shared, so tests must not modify it."""
    root = tmp_path_factory.mktemp("brats_ped")
    generate_dataset(root, num_train=6, num_val=2, seed=0, shape=SMALL_SHAPE)
    return root
