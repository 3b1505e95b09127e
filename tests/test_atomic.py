"""Atomic writes: complete under the final name or absent, and what killed writers leave is cleaned up safely."""

from __future__ import annotations

import os

import pytest

from scripts.atomic import atomic_output, is_temporary, remove_stale_temporaries, write_text_atomic
from tests.conftest import leave_a_temporary


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    write_text_atomic(tmp_path / "result.json", "old")
    with pytest.raises(RuntimeError), atomic_output(tmp_path / "result.json") as temporary:
        temporary.write_text("half")
        raise RuntimeError("writer failed")
    assert os.listdir(tmp_path) == ["result.json"] and (tmp_path / "result.json").read_text() == "old"


def test_only_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = leave_a_temporary(tmp_path / "case.nii.gz")
    with atomic_output(tmp_path / "other.nii.gz", suffix=".nii.gz") as live:
        live.write_bytes(b"in progress")
        assert is_temporary(dead) and is_temporary(live) and not is_temporary(tmp_path / "other.nii.gz")
        assert remove_stale_temporaries(tmp_path) == [dead]
        assert live.exists() and not dead.exists()
    assert os.listdir(tmp_path) == ["other.nii.gz"]
    assert (tmp_path / "other.nii.gz").stat().st_mode & 0o777 == 0o644
