"""Synthetic BraTS-PED cases: geometry, layout, labels and contrasts match the real data's."""

from __future__ import annotations

import re

import fire
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from scripts.cases import MODALITIES, TRAINING_FOLDER, VALIDATION_FOLDER
from scripts.labels import SCHEMES
from scripts.prepare_datalist import make_datalist
from scripts.synthetic import (
    _CODE,
    BRATS_AFFINE,
    BRATS_SHAPE,
    FOCUS_RADIUS_MM,
    NO_ET_FRACTION,
    RIM_MM,
    _enhancing,
    _sample_tumours,
    generate_dataset,
    grid_affine,
    main,
    make_case,
    write_case,
)
from tests.conftest import SMALL_SHAPE

TINY_SHAPE = (32, 32, 20)


@pytest.fixture(scope="module")
def cases() -> list[tuple[dict, np.ndarray, np.ndarray]]:
    """A few small cases with enhancing tumour, made once for the content tests."""
    return [make_case(seed, SMALL_SHAPE, with_et=True) for seed in range(4)]


@pytest.fixture(scope="module")
def cases_2024() -> list[tuple[dict, np.ndarray, np.ndarray]]:
    """Small cases labelled in brats2024_ped: seeds 0, 6 and 7 hold cysts, seed 6 no enhancing tumour."""
    return [make_case(seed, SMALL_SHAPE, label_scheme="brats2024_ped") for seed in range(8)]


PED_2024 = SCHEMES["brats2024_ped"]
# The 2024 label values by abbreviation, as the scheme defines them.
VALUE_OF = {abbreviation: value for value, (abbreviation, _) in PED_2024.labels.items()}
ET, NET, CC, ED = (VALUE_OF[abbreviation] for abbreviation in ("ET", "NET", "CC", "ED"))


def brain_of(images: dict[str, np.ndarray]) -> np.ndarray:
    return images["t1n"] > 0


def test_brats_grid_affine_is_the_challenge_one():
    expected = np.array([[-1, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]])
    np.testing.assert_array_equal(grid_affine(BRATS_SHAPE), expected)
    assert nib.aff2axcodes(BRATS_AFFINE) == ("L", "P", "S")


def test_small_grid_keeps_field_of_view_and_spacing():
    affine = grid_affine(SMALL_SHAPE)
    np.testing.assert_allclose(nib.affines.voxel_sizes(affine), [3.75, 3.75, 3.875])
    for corner_small, corner_full in [(-0.5, -0.5), (np.array(SMALL_SHAPE) - 0.5, np.array(BRATS_SHAPE) - 0.5)]:
        np.testing.assert_allclose(
            nib.affines.apply_affine(affine, np.broadcast_to(corner_small, 3)),
            nib.affines.apply_affine(BRATS_AFFINE, np.broadcast_to(corner_full, 3)),
        )


def test_case_arrays_have_grid_shape_and_types(cases):
    images, seg, affine = cases[0]
    assert list(images) == list(MODALITIES)
    assert all(image.shape == SMALL_SHAPE and image.dtype == np.float32 for image in images.values())
    assert seg.shape == SMALL_SHAPE and seg.dtype == np.uint8
    np.testing.assert_array_equal(affine, grid_affine(SMALL_SHAPE))


def test_zero_exactly_outside_the_brain_and_positive_inside(cases):
    for images, seg, _ in cases:
        brain = brain_of(images)
        assert 0.05 < brain.mean() < 0.4
        for image in images.values():
            np.testing.assert_array_equal(image > 0, brain)
            assert np.all(image[~brain] == 0)
        assert not np.any(seg[~brain])


def test_labels_are_2023_values_with_nested_regions(cases):
    for images, seg, _ in cases:
        assert set(np.unique(seg)) == {0, 1, 2, 3}
        brain = brain_of(images)
        core = (seg == 1) | (seg == 3)
        # Every core voxel's in-brain neighbours are tumour: the core sits inside an edema shell.
        assert not np.any(ndimage.binary_dilation(core) & brain & (seg == 0))
        assert np.count_nonzero(seg == 2) > np.count_nonzero(core) / 4


def test_enhancing_tumour_can_be_forced_off_or_on():
    for seed in range(3):
        _, seg_without, _ = make_case(seed, TINY_SHAPE, with_et=False)
        _, seg_with, _ = make_case(seed, TINY_SHAPE, with_et=True)
        assert not np.any(seg_without == 3) and np.any(seg_without == 1) and np.any(seg_without == 2)
        assert np.any(seg_with == 3)


def test_some_cases_lack_enhancing_tumour_by_default():
    has_et = [np.any(make_case(seed, TINY_SHAPE)[1] == 3) for seed in range(40)]
    assert 0.5 * NO_ET_FRACTION * 40 <= has_et.count(False) <= 2 * NO_ET_FRACTION * 40


SPACING_MM = np.array([1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def solid_ball() -> np.ndarray:
    """A solid tumour core: a ball of radius 12 mm on a 1 mm grid."""
    axes = np.indices((31, 31, 31)) - 15
    return np.sum(axes**2, axis=0) <= 12**2


def et_of_kind(kind: str, solid: np.ndarray, seed: int) -> np.ndarray:
    et = _enhancing(kind, solid, SPACING_MM, np.full(3, 4.0), np.random.default_rng(seed))
    assert et.any() and not np.any(et & ~solid)
    return et


def test_an_enhancing_rim_is_a_thin_broken_shell_at_the_core_surface(solid_ball):
    depth = ndimage.distance_transform_edt(np.pad(solid_ball, 1))[1:-1, 1:-1, 1:-1]
    shell = solid_ball & (depth <= RIM_MM[1])
    for seed in range(4):
        et = et_of_kind("rim", solid_ball, seed)
        assert depth[et].max() <= RIM_MM[1] and np.count_nonzero(et) < np.count_nonzero(shell)


def test_enhancing_foci_are_a_few_small_separate_nodules(solid_ball):
    largest_focus = 4 / 3 * np.pi * (FOCUS_RADIUS_MM[1] + 0.5) ** 3
    for seed in range(4):
        et = et_of_kind("foci", solid_ball, seed)
        labels, count = ndimage.label(et, np.ones((3, 3, 3)))
        assert 1 <= count <= 6
        # Nodules may touch, but together they stay a few small balls: no more than six of the largest.
        assert np.count_nonzero(et) <= 6 * largest_focus
    counts = [ndimage.label(et_of_kind("foci", solid_ball, seed), np.ones((3, 3, 3)))[1] for seed in range(8)]
    assert max(counts) >= 3


def test_enhancing_patches_cover_a_small_part_of_the_core(solid_ball):
    for seed in range(4):
        assert np.count_nonzero(et_of_kind("patches", solid_ball, seed)) < 0.25 * np.count_nonzero(solid_ball)


def test_a_case_can_have_several_enhancing_lesions():
    axes = np.indices((80, 90, 75))
    radii = np.array([35, 42, 33]).reshape(3, 1, 1, 1)
    brain = np.sum(((axes - np.array([40, 45, 37]).reshape(3, 1, 1, 1)) / radii) ** 2, axis=0) < 1
    lesions = []
    for seed in range(8):
        tumours = _sample_tumours(brain, np.full(3, 2.0), True, False, np.random.default_rng(seed))
        sizes = np.bincount(ndimage.label(tumours == _CODE["et"], np.ones((3, 3, 3)))[0].ravel())[1:]
        # Lesions the official scorer counts: over 50 mm^3 (7 voxels of 8 mm^3).
        lesions.append(np.count_nonzero(sizes > 6))
    assert min(lesions) >= 1 and sum(count >= 2 for count in lesions) >= 4


def test_sub_region_contrasts(cases):
    for images, seg, _ in cases:
        normal = brain_of(images) & (seg == 0)
        edema, ncr, et = seg == 2, seg == 1, seg == 3
        t1c, t1n, t2f, t2w = (images[modality] for modality in ("t1c", "t1n", "t2f", "t2w"))
        assert t2f[edema].mean() > 1.2 * t2f[normal].mean()
        assert t2w[edema].mean() > t2w[normal].mean()
        assert t1c[et].mean() > 1.5 * t1c[ncr].mean()
        assert t1c[et].mean() > t1c[normal].mean()
        assert t1n[ncr].mean() < t1n[normal].mean()
        assert t2w[ncr].mean() > t2w[normal].mean()


def test_the_2023_stream_is_unchanged(cases):
    """Seeds give the cases they always gave (the demo and the metric benchmark rely on it): label counts and
    image sums of the output since enhancing tumour came in several kinds."""
    images, seg, _ = cases[1]
    assert np.bincount(seg.ravel()).tolist() == [162454, 300, 1045, 41]
    sums = {modality: images[modality].sum(dtype=np.float64) for modality in MODALITIES}
    expected = {"t1c": 17720731.3281, "t1n": 29156373.6681, "t2f": 4891369.196, "t2w": 13529612.7493}
    assert sums == pytest.approx(expected, rel=1e-6)


def test_2024_cases_hold_the_2024_labels_with_cysts_inside_the_core(cases_2024):
    assert sorted(PED_2024.values) == [0, ET, NET, CC, ED] == [0, 1, 2, 3, 4]
    with_cyst = []
    for images, seg, _ in cases_2024:
        assert set(np.unique(seg)) <= PED_2024.values and {NET, ED} <= set(np.unique(seg))
        brain = brain_of(images)
        assert not np.any(seg[~brain])
        # Tumour tissue walls a cyst in: every in-brain neighbour of a cyst voxel is tumour core.
        assert not np.any(ndimage.binary_dilation(seg == CC) & brain & ~PED_2024.region_mask(seg, "TC"))
        with_cyst.append(bool(np.any(seg == CC)))
    assert with_cyst == [True, False, False, False, False, False, True, True]
    assert [bool(np.any(seg == ET)) for _, seg, _ in cases_2024].count(False) == 1


def test_2024_cysts_are_fluid_dark_on_t1_and_bright_on_t2(cases_2024):
    for images, seg, _ in cases_2024:
        cyst, solid = seg == CC, (seg == NET) | (seg == ET)
        if not cyst.any():
            continue
        normal = brain_of(images) & (seg == 0)
        t1c, t1n, t2w = (images[modality] for modality in ("t1c", "t1n", "t2w"))
        assert t1c[cyst].mean() < 0.75 * t1c[solid].mean()
        assert t1n[cyst].mean() < 0.75 * t1n[normal].mean()
        assert t2w[cyst].mean() > 1.15 * t2w[solid].mean()
        assert t2w[cyst].mean() > 1.5 * t2w[normal].mean()


def test_2024_enhancing_tumour_can_be_forced_off_or_on():
    for seed in range(3):
        _, seg_without, _ = make_case(seed, TINY_SHAPE, with_et=False, label_scheme="brats2024_ped")
        _, seg_with, _ = make_case(seed, TINY_SHAPE, with_et=True, label_scheme="brats2024_ped")
        assert not np.any(seg_without == ET) and np.any(seg_without == NET) and np.any(seg_without == ED)
        assert np.any(seg_with == ET)


def test_a_generated_2024_dataset_is_told_apart_by_the_datalist_command(tmp_path):
    generate_dataset(tmp_path, num_train=3, num_val=1, seed=0, shape=TINY_SHAPE, label_scheme="brats2024_ped")
    datalist, problems = make_datalist(tmp_path, num_folds=2)
    assert problems == [] and datalist["label_scheme"] == "brats2024_ped"


def test_healthy_tissue_contrasts_follow_each_sequence():
    """CSF, the darkest tissue on T1, is bright on T2 and dark on FLAIR."""
    images, seg, _ = make_case(0, SMALL_SHAPE, with_et=False)
    normal = brain_of(images) & (seg == 0)
    t1, t2, flair = (images[m][normal] for m in ("t1n", "t2w", "t2f"))
    csf_like = t1 < np.percentile(t1, 5)
    assert t2[csf_like].mean() > np.percentile(t2, 75)
    assert flair[csf_like].mean() < np.percentile(flair, 25)


def test_reproducible_from_seed():
    first, second, other = (make_case(seed, TINY_SHAPE) for seed in (7, 7, 8))
    np.testing.assert_array_equal(first[1], second[1])
    for modality in MODALITIES:
        np.testing.assert_array_equal(first[0][modality], second[0][modality])
    assert not np.array_equal(first[0]["t1c"], other[0]["t1c"])


def test_written_files_follow_the_challenge_layout(synthetic_dataset):
    train_dir, val_dir = synthetic_dataset / TRAINING_FOLDER, synthetic_dataset / VALIDATION_FOLDER
    assert sorted(p.name for p in synthetic_dataset.iterdir()) == sorted([TRAINING_FOLDER, VALIDATION_FOLDER])
    train_ids = sorted(p.name for p in train_dir.iterdir())
    val_ids = sorted(p.name for p in val_dir.iterdir())
    assert len(train_ids) == 6 and len(val_ids) == 2 and not set(train_ids) & set(val_ids)
    numbers = sorted(int(re.fullmatch(r"BraTS-PED-(\d{5})-000", case).group(1)) for case in train_ids + val_ids)
    assert np.any(np.diff(numbers) > 1)
    for folder, case_ids, keys in [(train_dir, train_ids, (*MODALITIES, "seg")), (val_dir, val_ids, MODALITIES)]:
        for case_id in case_ids:
            expected = sorted(f"{case_id}-{key}.nii.gz" for key in keys)
            assert sorted(p.name for p in (folder / case_id).iterdir()) == expected


def test_written_headers_match_brats(tmp_path):
    images = {modality: np.ones(BRATS_SHAPE, np.float32) for modality in MODALITIES}
    seg = np.zeros(BRATS_SHAPE, np.uint8)
    paths = write_case(tmp_path / "BraTS-PED-00002-000", "BraTS-PED-00002-000", images, seg, BRATS_AFFINE)
    assert [p.name for p in paths][-1] == "BraTS-PED-00002-000-seg.nii.gz"
    for path in paths:
        image = nib.load(path)
        assert image.shape == BRATS_SHAPE and image.header.get_zooms() == (1.0, 1.0, 1.0)
        assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
        np.testing.assert_allclose(image.header.get_qform(), BRATS_AFFINE)
        np.testing.assert_allclose(image.header.get_sform(), BRATS_AFFINE)
        assert image.get_data_dtype() == (np.uint8 if path.name.endswith("seg.nii.gz") else np.float32)


def test_written_case_round_trips(synthetic_dataset):
    case_dir = sorted((synthetic_dataset / TRAINING_FOLDER).iterdir())[0]
    seg = np.asanyarray(nib.load(case_dir / f"{case_dir.name}-seg.nii.gz").dataobj)
    t1c = nib.load(case_dir / f"{case_dir.name}-t1c.nii.gz")
    assert seg.shape == SMALL_SHAPE and np.any(seg > 0)
    np.testing.assert_allclose(t1c.affine, grid_affine(SMALL_SHAPE))
    assert not np.any(seg[t1c.get_fdata() == 0])


def test_refuses_to_overwrite_a_case_unless_asked(tmp_path):
    first = generate_dataset(tmp_path, num_train=1, num_val=1, seed=3, shape=TINY_SHAPE)
    with pytest.raises(FileExistsError, match=first["training"][0]):
        generate_dataset(tmp_path, num_train=1, num_val=1, seed=3, shape=TINY_SHAPE)
    again = generate_dataset(tmp_path, num_train=1, num_val=1, seed=3, shape=TINY_SHAPE, overwrite=True)
    assert again == first


def test_command_line_writes_both_folders(tmp_path, capsys):
    command = [
        "--output_dir",
        str(tmp_path),
        "--num_train",
        "2",
        "--num_val",
        "1",
        "--seed",
        "5",
        "--shape",
        "32,32,20",
    ]
    fire.Fire(main, command=command)
    printed = capsys.readouterr().out
    train_cases = sorted(p.name for p in (tmp_path / TRAINING_FOLDER).iterdir())
    val_cases = [p.name for p in (tmp_path / VALIDATION_FOLDER).iterdir()]
    assert len(train_cases) == 2 and len(val_cases) == 1
    assert all(case in printed for case in train_cases + val_cases)
    seg = nib.load(tmp_path / TRAINING_FOLDER / train_cases[0] / f"{train_cases[0]}-seg.nii.gz")
    assert seg.shape == TINY_SHAPE


def test_command_line_writes_2024_labels(tmp_path, capsys):
    command = ["--output_dir", str(tmp_path), "--num_train", "2", "--num_val", "0", "--shape", "32,32,20"]
    fire.Fire(main, command=[*command, "--label_scheme", "brats2024_ped", "--seed", "3"])
    for case_dir in (tmp_path / TRAINING_FOLDER).iterdir():
        seg = np.asanyarray(nib.load(case_dir / f"{case_dir.name}-seg.nii.gz").dataobj)
        assert {NET, ED} <= set(np.unique(seg)) <= PED_2024.values
    with pytest.raises(SystemExit) as exit_info:
        fire.Fire(main, command=[*command, "--label_scheme", "brats2024"])
    assert exit_info.value.code == 1
    assert "unknown label_scheme 'brats2024'" in capsys.readouterr().err


def test_command_line_refuses_existing_cases(tmp_path, capsys):
    command = ["--output_dir", str(tmp_path), "--num_train", "1", "--num_val", "0", "--shape", "32x32x20"]
    fire.Fire(main, command=command)
    case_id = next((tmp_path / TRAINING_FOLDER).iterdir()).name
    with pytest.raises(SystemExit) as exit_info:
        fire.Fire(main, command=command)
    assert exit_info.value.code == 1
    assert case_id in capsys.readouterr().err
