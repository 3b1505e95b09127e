"""Datalist and folds: discovery, checks of every case, balanced reproducible folds, fold_split."""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import pytest

from scripts.prepare_datalist import (
    MODALITIES,
    TRAINING_FOLDER,
    VALIDATION_FOLDER,
    _stored_size_matches,
    assign_folds,
    case_files,
    check_case,
    find_case_dirs,
    fold_split,
    main,
    make_datalist,
)
from scripts.synthetic import BRATS_AFFINE, write_case

TINY = (6, 6, 4)


def tiny_case(folder: Path, number: int, with_seg: bool = True) -> Path:
    """A minimal valid case (6x6x4 voxels) in ``folder``; returns its case folder."""
    case_id = f"BraTS-PED-{number:05d}-000"
    images = {modality: np.full(TINY, index + 1, np.float32) for index, modality in enumerate(MODALITIES)}
    seg = np.zeros(TINY, np.uint8)
    seg[2:4, 2:4, 1:3] = [[[1, 2], [2, 3]], [[2, 2], [1, 1]]]
    write_case(folder / case_id, case_id, images, seg if with_seg else None, BRATS_AFFINE)
    return folder / case_id


def tiny_dataset(root: Path, num_train: int, num_val: int) -> Path:
    """Challenge layout with ``num_train`` labelled and ``num_val`` unlabelled tiny cases, ids 3 apart."""
    for index in range(num_train + num_val):
        folder = TRAINING_FOLDER if index < num_train else VALIDATION_FOLDER
        tiny_case(root / folder, 3 * index + 1, with_seg=index < num_train)
    return root


def save_like(case_dir: Path, key: str, data: np.ndarray, affine: np.ndarray = BRATS_AFFINE) -> Path:
    path = case_dir / f"{case_dir.name}-{key}.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def test_synthetic_dataset_is_clean_and_listed(synthetic_dataset):
    datalist, problems = make_datalist(synthetic_dataset, num_folds=5, seed=0)
    assert problems == []
    assert len(datalist["training"]) == 6 and len(datalist["testing"]) == 2
    assert sorted(Counter(entry["fold"] for entry in datalist["training"]).values()) == [1, 1, 1, 1, 2]
    for entry in datalist["training"] + datalist["testing"]:
        assert not any(os.path.isabs(path) for path in entry["image"])
        assert all((synthetic_dataset / path).is_file() for path in entry["image"])
    entry = datalist["training"][0]
    case_id = Path(entry["label"]).parent.name
    assert entry["image"] == [f"{TRAINING_FOLDER}/{case_id}/{case_id}-{m}.nii.gz" for m in MODALITIES]
    assert entry["label"] == f"{TRAINING_FOLDER}/{case_id}/{case_id}-seg.nii.gz"
    assert all(entry["image"][0].startswith(VALIDATION_FOLDER) for entry in datalist["testing"])
    assert all("label" not in entry for entry in datalist["testing"])


def test_finds_cases_in_a_folder_of_case_folders(tmp_path):
    root = tiny_dataset(tmp_path, 4, 2)
    assert [p.name for p in find_case_dirs(root / TRAINING_FOLDER)] == [f"BraTS-PED-{n:05d}-000" for n in (1, 4, 7, 10)]
    datalist, problems = make_datalist(root / TRAINING_FOLDER, num_folds=2)
    assert problems == [] and len(datalist["training"]) == 4
    assert datalist["training"][0]["label"] == "BraTS-PED-00001-000/BraTS-PED-00001-000-seg.nii.gz"
    assert len(find_case_dirs(root)) == 6


def test_case_files_lists_modalities_in_order(tmp_path):
    case_dir = tiny_case(tmp_path, 2, with_seg=False)
    case = case_files(case_dir)
    assert case["case"] == "BraTS-PED-00002-000" and case["label"] is None
    assert [Path(p).name for p in case["image"]] == [f"BraTS-PED-00002-000-{m}.nii.gz" for m in MODALITIES]
    assert all(os.path.isabs(p) for p in case["image"])


def test_folds_partition_and_balance():
    ids = [f"BraTS-PED-{n:05d}-000" for n in range(3, 72, 3)]
    folds = assign_folds(ids, num_folds=5, seed=0)
    assert sorted(folds) == sorted(ids)
    assert sorted(Counter(folds.values()).values()) == [4, 4, 5, 5, 5]
    ten = assign_folds(ids, num_folds=10, seed=0)
    assert sorted(Counter(ten.values()).values()) == [2] * 7 + [3] * 3


def test_folds_reproducible_for_a_seed_and_independent_of_input_order():
    ids = [f"BraTS-PED-{n:05d}-000" for n in range(1, 40, 2)]
    assert assign_folds(ids, 5, seed=1) == assign_folds(list(reversed(ids)), 5, seed=1)
    assert assign_folds(ids, 5, seed=1) != assign_folds(ids, 5, seed=2)


@pytest.mark.parametrize("num_folds", [1, 6])
def test_fold_count_must_fit_the_cases(num_folds):
    with pytest.raises(ValueError, match="num_folds"):
        assign_folds(["a", "b", "c", "d", "e"], num_folds, seed=0)


def break_case(case_dir: Path, defect: str) -> tuple[str, str]:
    """Damage one file of a tiny case; returns (file name, expected reason fragment)."""
    case_id = case_dir.name
    if defect == "missing modality":
        (case_dir / f"{case_id}-t2w.nii.gz").unlink()
        return f"{case_id}-t2w.nii.gz", "missing"
    if defect == "shape":
        save_like(case_dir, "t1n", np.ones((6, 6, 5), np.float32))
        return f"{case_id}-t1n.nii.gz", "shape (6, 6, 5) differs"
    if defect == "affine":
        shifted = BRATS_AFFINE.copy()
        shifted[0, 3] += 0.01
        save_like(case_dir, "t2f", np.ones(TINY, np.float32), shifted)
        return f"{case_id}-t2f.nii.gz", "affine differs"
    if defect == "label 4":
        seg = np.zeros(TINY, np.uint8)
        seg[1, 1, 1] = 4
        save_like(case_dir, "seg", seg)
        return f"{case_id}-seg.nii.gz", "label values [4]"
    if defect == "garbage":
        (case_dir / f"{case_id}-t1c.nii.gz").write_bytes(b"not a nifti file at all" * 20)
        return f"{case_id}-t1c.nii.gz", "unreadable"
    if defect == "truncated":
        path = case_dir / f"{case_id}-t1n.nii.gz"
        nib.save(nib.Nifti1Image(np.random.default_rng(0).random((40, 40, 30), np.float32), BRATS_AFFINE), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return f"{case_id}-t1n.nii.gz", "unreadable"
    if defect == "no seg in training folder":
        (case_dir / f"{case_id}-seg.nii.gz").unlink()
        return f"{case_id}-seg.nii.gz", "missing"
    raise ValueError(defect)


DEFECTS = ["missing modality", "shape", "affine", "label 4", "garbage", "truncated", "no seg in training folder"]


@pytest.mark.parametrize("defect", DEFECTS)
def test_bad_case_is_named_and_left_out(tmp_path, defect):
    root = tiny_dataset(tmp_path, 5, 1)
    bad_dir = root / TRAINING_FOLDER / "BraTS-PED-00007-000"
    file_name, reason = break_case(bad_dir, defect)
    datalist, problems = make_datalist(root, num_folds=2)
    assert len(problems) == 1
    assert problems[0].startswith("BraTS-PED-00007-000: ")
    assert file_name in problems[0] and reason in problems[0]
    listed = [Path(entry["label"]).parent.name for entry in datalist["training"]]
    assert "BraTS-PED-00007-000" not in listed and len(listed) == 4
    assert len(datalist["testing"]) == 1


def test_truncated_case_is_caught_from_the_header_alone(tmp_path):
    case_dir = tiny_case(tmp_path, 5)
    _, reason = break_case(case_dir, "truncated")
    assert any(reason in problem for problem in check_case(case_files(case_dir), check_labels=False))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_size_check_accepts_complete_files_without_reading_them(tmp_path, suffix):
    path = str(tmp_path / f"volume{suffix}")
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((30, 20, 10), np.float32), BRATS_AFFINE), path)
    assert _stored_size_matches(path, nib.load(path))
    Path(path).write_bytes(Path(path).read_bytes()[:-100])
    assert not _stored_size_matches(path, nib.load(path))


def test_label_values_are_checked_only_when_asked(tmp_path):
    case_dir = tiny_case(tmp_path, 5)
    break_case(case_dir, "label 4")
    assert check_case(case_files(case_dir), check_labels=False) == []
    assert len(check_case(case_files(case_dir), check_labels=True)) == 1


def test_command_line_writes_atomically_and_summarises(tmp_path, capsys):
    root = tiny_dataset(tmp_path / "data", 12, 3)
    output = tmp_path / "new" / "folder" / "datalist.json"
    fire.Fire(main, command=["--dataset_dir", str(root), "--output", str(output), "--num_folds", "10"])
    datalist = json.loads(output.read_text())
    assert sorted(Counter(entry["fold"] for entry in datalist["training"]).values()) == [1] * 8 + [2] * 2
    assert len(datalist["testing"]) == 3
    assert os.listdir(output.parent) == ["datalist.json"]
    printed = capsys.readouterr().out
    assert "12 training cases in 10 folds" in printed and "3 testing cases" in printed and "0 left out" in printed


def test_command_line_reports_bad_cases_on_stderr(tmp_path, capsys):
    root = tiny_dataset(tmp_path / "data", 6, 0)
    break_case(root / TRAINING_FOLDER / "BraTS-PED-00004-000", "label 4")
    output = tmp_path / "datalist.json"
    fire.Fire(main, command=["--dataset_dir", str(root), "--output", str(output), "--num_folds", "5"])
    captured = capsys.readouterr()
    assert "BraTS-PED-00004-000" in captured.err and "label values [4]" in captured.err
    assert "1 left out" in captured.out and "5 training cases" in captured.out
    assert len(json.loads(output.read_text())["training"]) == 5


def test_strict_fails_without_writing(tmp_path, capsys):
    root = tiny_dataset(tmp_path / "data", 6, 0)
    break_case(root / TRAINING_FOLDER / "BraTS-PED-00004-000", "shape")
    output = tmp_path / "out" / "datalist.json"
    with pytest.raises(SystemExit) as exit_info:
        fire.Fire(main, command=["--dataset_dir", str(root), "--output", str(output), "--strict"])
    assert exit_info.value.code == 1
    assert not output.exists() and not output.parent.exists()
    assert "BraTS-PED-00004-000" in capsys.readouterr().err


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no case folders"):
        make_datalist(tmp_path)


def test_fold_split_gives_disjoint_absolute_cases(tmp_path):
    root = tiny_dataset(tmp_path, 10, 2)
    datalist, _ = make_datalist(root, num_folds=5, seed=3)
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(datalist))
    train, val = fold_split(str(path), str(root), fold=2)
    assert len(train) == 8 and len(val) == 2
    train_ids, val_ids = {c["case"] for c in train}, {c["case"] for c in val}
    assert not train_ids & val_ids and len(train_ids | val_ids) == 10
    expected_val = {Path(e["label"]).parent.name for e in datalist["training"] if e["fold"] == 2}
    assert val_ids == expected_val
    for case in train + val:
        assert set(case) == {"image", "label", "case"}
        assert os.path.isabs(case["label"]) and Path(case["label"]).is_file()
        assert case["image"][0].endswith(f"{case['case']}/{case['case']}-t1c.nii.gz")
    assert fold_split(datalist, root, fold=2) == (train, val)


def test_fold_split_names_datalist_and_folds_when_out_of_range(tmp_path):
    root = tiny_dataset(tmp_path, 6, 0)
    datalist, _ = make_datalist(root, num_folds=3)
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(datalist))
    with pytest.raises(ValueError, match=r"fold 3 .*datalist\.json.*\[0, 1, 2\]"):
        fold_split(path, root, fold=3)


def test_multi_member_gzip_is_not_mistaken_for_truncation(tmp_path):
    """A valid file written as two gzip members fails the cheap size test but must still pass."""
    case_dir = tiny_case(tmp_path, 9)
    path = case_dir / f"{case_dir.name}-t2w.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:200]) + gzip.compress(raw[200:]))
    assert check_case(case_files(case_dir)) == []
