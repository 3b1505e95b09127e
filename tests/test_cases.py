"""The BraTS case layout: finding case folders and saying why others are not, file names, the checks of a case,
and the loading transform that refuses bad voxels."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImaged

from scripts.cases import (
    MODALITIES,
    TRAINING_FOLDER,
    LoadCaseImaged,
    _stored_size_matches,
    case_files,
    case_id_from_path,
    check_case,
    cohort_problem,
    find_case_dirs,
    survey_case,
    survey_folders,
    volume_problem,
)
from scripts.errors import InputError
from scripts.synthetic import BRATS_AFFINE, write_case

TINY = (6, 6, 4)


def tiny_case(
    folder: Path, number: int, with_seg: bool = True, case_id: str | None = None, labels: tuple[int, ...] = (1, 2, 3)
) -> Path:
    """A minimal valid case (6x6x4 voxels) in ``folder`` whose seg holds 0 and `labels` (by default the 2023 ones);
    returns its case folder."""
    case_id = case_id or f"BraTS-PED-{number:05d}-000"
    images = {modality: np.full(TINY, index + 1, np.float32) for index, modality in enumerate(MODALITIES)}
    seg = np.zeros(TINY, np.uint8)
    seg[2:4, 2:4, 1:3] = np.resize(labels, 8).reshape(2, 2, 2)
    write_case(folder / case_id, case_id, images, seg if with_seg else None, BRATS_AFFINE)
    return folder / case_id


def save_like(case_dir: Path, key: str, data: np.ndarray, affine: np.ndarray = BRATS_AFFINE) -> Path:
    path = case_dir / f"{case_dir.name}-{key}.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


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
    if defect == "non-finite voxels":
        t1c = np.full(TINY, 1, np.float32)
        t1c[0, 0, 0], t1c[1, 2, 3], t1c[5, 5, 0] = np.nan, np.inf, -np.inf
        save_like(case_dir, "t1c", t1c)
        return f"{case_id}-t1c.nii.gz", "3 non-finite voxels (NaN/Inf)"
    if defect == "all-zero modality":
        save_like(case_dir, "t2f", np.zeros(TINY, np.float32))
        return f"{case_id}-t2f.nii.gz", "all voxels are zero (empty volume)"
    raise ValueError(defect)


def test_case_files_lists_modalities_in_order(tmp_path):
    case_dir = tiny_case(tmp_path, 2, with_seg=False)
    case = case_files(case_dir)
    assert case["case"] == "BraTS-PED-00002-000" and case["label"] is None
    assert [Path(p).name for p in case["image"]] == [f"BraTS-PED-00002-000-{m}.nii.gz" for m in MODALITIES]
    assert all(os.path.isabs(p) for p in case["image"])


def test_truncated_case_is_caught_from_the_header_alone(tmp_path):
    case_dir = tiny_case(tmp_path, 5)
    _, reason = break_case(case_dir, "truncated")
    assert any(reason in problem for problem in check_case(case_files(case_dir), check_data=False))


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
    assert check_case(case_files(case_dir), check_data=False) == []
    assert len(check_case(case_files(case_dir), check_labels=True)) == 1


def test_multi_member_gzip_is_not_mistaken_for_truncation(tmp_path):
    """A valid file written as two gzip members fails the cheap size test but must still pass."""
    case_dir = tiny_case(tmp_path, 9)
    path = case_dir / f"{case_dir.name}-t2w.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:200]) + gzip.compress(raw[200:]))
    assert check_case(case_files(case_dir)) == []
    assert check_case(case_files(case_dir), check_data=False) == []


@pytest.mark.parametrize("defect", ["non-finite voxels", "all-zero modality"])
def test_bad_voxels_are_reported_per_file_only_when_data_is_read(tmp_path, defect):
    case_dir = tiny_case(tmp_path, 3)
    file_name, reason = break_case(case_dir, defect)
    assert check_case(case_files(case_dir)) == [f"BraTS-PED-00003-000: {case_dir / file_name}: {reason}"]
    assert check_case(case_files(case_dir), check_data=False) == []


def test_every_empty_modality_is_named(tmp_path):
    case_dir = tiny_case(tmp_path, 3)
    for modality in MODALITIES:
        save_like(case_dir, modality, np.zeros(TINY, np.int16))
    assert check_case(case_files(case_dir)) == [
        f"BraTS-PED-00003-000: {case_dir}/BraTS-PED-00003-000-{m}.nii.gz: all voxels are zero (empty volume)"
        for m in MODALITIES
    ]


def test_fractional_label_values_are_named(tmp_path):
    case_dir = tiny_case(tmp_path, 3)
    seg = np.zeros(TINY, np.float32)
    seg[1, 1, 1], seg[2, 2, 2], seg[3, 3, 3] = 1.5, np.nan, 2
    path = save_like(case_dir, "seg", seg)
    assert check_case(case_files(case_dir)) == [f"BraTS-PED-00003-000: {path}: non-integer label values [1.5, nan]"]


OUTSIDE = "outside [0, 1, 2, 3] (brats2023_ped: BraTS 2023 (pediatric and adult))"


@pytest.mark.parametrize(
    ("data", "label", "expected"),
    [
        (np.array([0.0, 1.0, np.nan]), False, "1 non-finite voxels (NaN/Inf)"),
        (np.zeros(5, np.uint8), False, "all voxels are zero (empty volume)"),
        (np.array([0, 3, 1], np.int16), False, None),
        (np.zeros(5, np.uint8), True, None),
        (np.array([0.0, 3.0, 2.0], np.float32), True, None),
        (np.array([0.0, 3.0, 4.0, -1.0], np.float32), True, f"label values [-1, 4] {OUTSIDE}"),
        (
            np.array([0, 1, 4], np.uint8),
            True,
            f"label values [4] {OUTSIDE}; they fit --label_scheme brats2024_ped or brats2021",
        ),
        (np.arange(12, dtype=np.uint16), True, f"label values [4, 5, 6, 7, 8] and 3 more {OUTSIDE}"),
        (np.array([0.0, np.inf]), True, "non-integer label values [inf]"),
    ],
)
def test_volume_problem_names_bad_images_and_labels(data, label, expected):
    assert volume_problem(data, label) == expected


@pytest.mark.parametrize(
    ("labels", "problems"),
    [
        ((1, 2, 3), {"brats2023_ped": None, "brats2024_ped": None, "brats2021": "[3] outside [0, 1, 2, 4]"}),
        ((1, 2, 3, 4), {"brats2023_ped": "[4] outside [0, 1, 2, 3]", "brats2024_ped": None, "brats2021": "[3]"}),
        ((1, 2, 4), {"brats2023_ped": "[4] outside", "brats2024_ped": None, "brats2021": None}),
    ],
)
def test_case_labels_are_checked_against_the_label_scheme(tmp_path, labels, problems):
    case_dir = tiny_case(tmp_path, 6, labels=labels)
    case = case_files(case_dir)
    problems_found, counts = survey_case(case)
    assert problems_found == [] and set(counts) == {0, *labels}
    assert sum(counts.values()) == np.prod(TINY) and min(counts.values()) > 0
    for scheme, problem in problems.items():
        found = check_case(case, label_scheme=scheme)
        if problem is None:
            assert found == []
        else:
            (line,) = found
            assert line.startswith(f"BraTS-PED-00006-000: {case['label']}: label values {problem}")
            assert f"({scheme}: " in line


def test_survey_of_an_unread_or_broken_seg_gives_no_values(tmp_path):
    case = case_files(tiny_case(tmp_path, 6))
    assert survey_case(case, check_labels=False) == ([], None)
    assert survey_case(case, check_data=False) == ([], None)
    save_like(Path(case["label"]).parent, "seg", np.full(TINY, 1.5, np.float32))
    assert survey_case(case) == ([f"BraTS-PED-00006-000: {case['label']}: non-integer label values [1.5]"], None)


def test_nii_files_are_a_case_like_nii_gz(tmp_path):
    case_dir = tiny_case(tmp_path, 8)
    for path in case_dir.iterdir():
        nib.save(nib.load(path), str(path)[: -len(".gz")])
        path.unlink()
    case = case_files(case_dir)
    assert find_case_dirs(tmp_path) == [case_dir]
    assert [Path(p).name for p in case["image"]] == [f"BraTS-PED-00008-000-{m}.nii" for m in MODALITIES]
    assert case["label"] == str(case_dir / "BraTS-PED-00008-000-seg.nii")
    assert check_case(case) == []
    assert case_id_from_path(case["image"][2]) == case_id_from_path(case["label"]) == "BraTS-PED-00008-000"


def test_one_modality_in_both_nii_and_nii_gz_is_a_problem(tmp_path):
    case_dir = tiny_case(tmp_path, 8)
    both = case_dir / "BraTS-PED-00008-000-t2w.nii.gz"
    nib.save(nib.load(both), case_dir / "BraTS-PED-00008-000-t2w.nii")
    assert check_case(case_files(case_dir)) == [
        f"BraTS-PED-00008-000: {both}: both BraTS-PED-00008-000-t2w.nii.gz and BraTS-PED-00008-000-t2w.nii exist: "
        "keep one"
    ]


def test_case_id_from_path():
    assert case_id_from_path("/d/BraTS-PED-00002-000/BraTS-PED-00002-000-t1c.nii.gz") == "BraTS-PED-00002-000"
    assert case_id_from_path("/d/BraTS-PED-00002-000/BraTS-PED-00002-000-t2w.nii") == "BraTS-PED-00002-000"
    assert case_id_from_path("/d/patient01/patient01-seg.nii") == "patient01"
    assert case_id_from_path("/d/case7/image.nii.gz") == "case7"


@pytest.mark.parametrize(
    ("case_id", "expected"),
    [
        ("BraTS-PED-00002-000", None),
        ("patient01", None),
        ("BraTS-GLI-00002-000", "case from the BraTS GLI cohort, not pediatric (PED): left out"),
        ("BraTS-MET-00110-000", "case from the BraTS MET cohort, not pediatric (PED): left out"),
        ("BraTS-SSA-00041-000", "case from the BraTS SSA cohort, not pediatric (PED): left out"),
    ],
)
def test_cohort_problem(case_id, expected):
    assert cohort_problem(case_id) == expected


def write_old_case(folder: Path, case_id: str) -> Path:
    """A case folder with BraTS 2018-2021 file names."""
    folder.mkdir(parents=True)
    for key in ("flair", "t1", "t1ce", "t2", "seg"):
        nib.save(nib.Nifti1Image(np.ones(TINY, np.float32), BRATS_AFFINE), folder / f"{case_id}_{key}.nii.gz")
    return folder


@pytest.mark.parametrize(
    ("training", "validation"),
    [
        ("Training", "Validation"),
        ("BraTS2024-PEDs-Training", "BraTS2024-PEDs-Validation"),
        ("ASNR-MICCAI-BraTS2023-PED-Challenge-TrainingData", "ASNR-MICCAI-BraTS2023-PED-Challenge-ValidationData"),
    ],
)
def test_survey_finds_the_cases_of_every_release_layout(tmp_path, training, validation):
    """The 2024+ BraTS-PEDs collection puts cases in Training/ and Validation/ (or challenge-named folders)."""
    train_cases = [tiny_case(tmp_path / training, number, labels=(1, 2, 3, 4)) for number in (1, 17)]
    val_cases = [tiny_case(tmp_path / validation, 90, with_seg=False)]
    assert survey_folders(tmp_path) == (sorted(train_cases + val_cases), [])


def test_survey_says_why_each_other_folder_is_not_a_case(tmp_path):
    training = tmp_path / TRAINING_FOLDER
    good = tiny_case(training, 1)
    old = write_old_case(training / "BraTS2021_00000", "BraTS2021_00000")
    renamed = tiny_case(training, 0, case_id="BraTS-GLI-00005-000").rename(training / "BraTS-PED-00005-000")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.txt").write_text("not data")
    deep = tmp_path / "archive" / "2023"
    tiny_case(deep, 9)
    odd = tmp_path / "odd"
    odd.mkdir()
    for name in ("a.nii.gz", "b.nii", "c.nii.gz", "d.nii.gz"):
        nib.save(nib.Nifti1Image(np.ones(TINY, np.float32), BRATS_AFFINE), odd / name)
    tiny_case(tmp_path / ".cache", 2)
    (training / ".ipynb_checkpoints").mkdir()

    case_dirs, problems = survey_folders(tmp_path)
    assert case_dirs == [good]
    assert problems == [
        f"BraTS-PED-00005-000: {renamed}: files are named for case BraTS-GLI-00005-000 "
        "(e.g. BraTS-GLI-00005-000-seg.nii.gz), not for the folder BraTS-PED-00005-000: "
        "a case folder and its files carry the same case id",
        f"BraTS2021_00000: {old}: files have BraTS 2018-2021 names (e.g. BraTS2021_00000_flair.nii.gz); "
        "BraTS 2023 names are expected: BraTS2021_00000-{t1c,t1n,t2f,t2w,seg}.nii.gz "
        "(t1ce -> t1c, t1 -> t1n, flair -> t2f, t2 -> t2w)",
        f"2023: {deep}: no NIfTI files (.nii.gz or .nii) (case folders are looked for in the dataset folder and "
        "one level down)",
        f"notes: {tmp_path / 'notes'}: no NIfTI files (.nii.gz or .nii)",
        f"odd: {odd}: no odd-t1c.nii.gz (or -t1n, -t2f, -t2w, -seg; .nii.gz or .nii); "
        "NIfTI files here: a.nii.gz, b.nii, c.nii.gz and 1 more",
    ]


def test_missing_dataset_folder_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match=f"dataset folder not found: {tmp_path / 'nowhere'}"):
        find_case_dirs(tmp_path / "nowhere")


@pytest.fixture
def loader_case(tmp_path) -> dict:
    """A tiny labelled case whose modalities differ, as the input dict of a loading transform."""
    case_dir = tiny_case(tmp_path, 4)
    for index, modality in enumerate(MODALITIES):
        save_like(case_dir, modality, np.arange(np.prod(TINY), dtype=np.float32).reshape(TINY) + index)
    case = case_files(case_dir)
    return {"image": case["image"], "label": case["label"]}


LOADER_SETTINGS = {"keys": ["image", "label"], "ensure_channel_first": True, "image_only": True}


def test_load_case_loads_a_clean_case_like_load_imaged(loader_case):
    loaded = LoadCaseImaged(**LOADER_SETTINGS)(loader_case)
    expected = LoadImaged(**LOADER_SETTINGS)(loader_case)
    assert set(loaded) == set(expected) == {"image", "label"}
    for key in expected:
        assert isinstance(loaded[key], MetaTensor) and loaded[key].shape == expected[key].shape
        assert torch.equal(loaded[key], expected[key])
        assert torch.equal(loaded[key].affine, expected[key].affine)
    assert loaded["image"].shape == (4, *TINY)


def test_load_case_keeps_meta_dicts_and_missing_keys(loader_case):
    settings = {**LOADER_SETTINGS, "image_only": False, "allow_missing_keys": True}
    loaded = LoadCaseImaged(**settings)({"image": loader_case["image"]})
    expected = LoadImaged(**settings)({"image": loader_case["image"]})
    assert set(loaded) == set(expected) == {"image", "image_meta_dict"}
    assert torch.equal(loaded["image"], expected["image"])


@pytest.mark.parametrize(
    ("index", "data", "reason"),
    [
        (2, "nan", "1 non-finite voxels (NaN/Inf)"),
        (1, "zeros", "all voxels are zero (empty volume)"),
        (4, "label 4", f"label values [4] {OUTSIDE}; they fit --label_scheme brats2024_ped"),
        (4, "label 1.5", "non-integer label values [1.5]"),
    ],
)
def test_load_case_refuses_bad_volumes_naming_the_file(loader_case, index, data, reason):
    paths = [*loader_case["image"], loader_case["label"]]
    volume = np.asanyarray(nib.load(paths[index]).dataobj).astype(np.float32)
    if data == "nan":
        volume[1, 1, 1] = np.nan
    elif data == "zeros":
        volume[:] = 0
    else:
        volume[1, 1, 1] = float(data.split()[1])
    nib.save(nib.Nifti1Image(volume, BRATS_AFFINE), paths[index])
    with pytest.raises(InputError) as caught:
        LoadCaseImaged(**LOADER_SETTINGS)(loader_case)
    assert caught.value.problems == [f"BraTS-PED-00004-000: {paths[index]}: {reason}"]


def test_load_case_checks_labels_of_its_label_scheme(loader_case):
    seg = np.zeros(TINY, np.uint8)
    seg[1:3, 1, 1:3] = [[1, 2], [3, 4]]
    nib.save(nib.Nifti1Image(seg, BRATS_AFFINE), loader_case["label"])
    loaded = LoadCaseImaged(**LOADER_SETTINGS, label_scheme="brats2024_ped")(loader_case)
    assert set(torch.unique(loaded["label"]).tolist()) == {0, 1, 2, 3, 4}
    with pytest.raises(InputError, match=r"label values \[4\] outside \[0, 1, 2, 3\] \(brats2023_ped"):
        LoadCaseImaged(**LOADER_SETTINGS)(loader_case)
    with pytest.raises(InputError, match=r"label values \[3\] outside \[0, 1, 2, 4\] \(brats2021"):
        LoadCaseImaged(**LOADER_SETTINGS, label_scheme="brats2021")(loader_case)


def test_load_case_refuses_an_unknown_label_scheme_when_built():
    with pytest.raises(InputError, match="unknown label_scheme 'brats2024'; valid: brats2023_ped, brats2024_ped"):
        LoadCaseImaged(**LOADER_SETTINGS, label_scheme="brats2024")


def test_load_case_lists_every_bad_file(loader_case):
    for path in loader_case["image"][1:3]:
        nib.save(nib.Nifti1Image(np.zeros(TINY, np.float32), BRATS_AFFINE), path)
    with pytest.raises(InputError) as caught:
        LoadCaseImaged(keys="image", ensure_channel_first=True)(loader_case)
    assert caught.value.problems == [
        f"BraTS-PED-00004-000: {path}: all voxels are zero (empty volume)" for path in loader_case["image"][1:3]
    ]
