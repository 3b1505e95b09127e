"""Datalist and folds: discovery, checks of every case, stratified reproducible folds, fold_split."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from scripts import prepare_datalist
from scripts.cases import MODALITIES, TRAINING_FOLDER, VALIDATION_FOLDER, find_case_dirs
from scripts.errors import DEBUG_VARIABLE, InputError
from scripts.prepare_datalist import (
    DatasetError,
    LabelSchemeError,
    assign_folds,
    detect_label_scheme,
    fold_split,
    fold_table,
    main,
    make_datalist,
    volume_tertiles,
)
from tests.test_cases import TINY, break_case, save_like, tiny_case, write_old_case


def tiny_dataset(root: Path, num_train: int, num_val: int, labels: tuple[int, ...] = (1, 2, 3)) -> Path:
    """Challenge layout with ``num_train`` labelled (0 and `labels`) and ``num_val`` unlabelled tiny cases,
    ids 3 apart."""
    for index in range(num_train + num_val):
        folder = TRAINING_FOLDER if index < num_train else VALIDATION_FOLDER
        tiny_case(root / folder, 3 * index + 1, with_seg=index < num_train, labels=labels)
    return root


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


def test_volume_tertiles_hold_a_third_each_whatever_the_ties():
    assert volume_tertiles({"a": 5, "b": 1, "c": 9}) == {"b": 0, "a": 1, "c": 2}
    tied = volume_tertiles({f"case{n}": 7 for n in range(7)})
    assert sorted(Counter(tied.values()).values()) == [2, 2, 3]
    assert volume_tertiles({"a": 3}) == {"a": 0} and volume_tertiles({}) == {}


def stratified_ids(num_cases: int, num_et_free: int, seed: int = 0) -> tuple[list[str], dict[str, tuple]]:
    """Case ids and their strata (has ET, volume tertile), the ET-free ones spread over the volumes at random."""
    rng = np.random.default_rng(seed)
    ids = [f"BraTS-PED-{n:05d}-000" for n in range(1, num_cases + 1)]
    et_free = set(rng.choice(ids, num_et_free, replace=False).tolist())
    tertiles = volume_tertiles(dict(zip(ids, rng.permutation(num_cases).tolist(), strict=True)))
    return ids, {case: (case not in et_free, tertiles[case]) for case in ids}


@pytest.mark.parametrize(("num_cases", "num_et_free", "num_folds"), [(99, 11, 5), (40, 7, 5), (23, 2, 10), (9, 1, 3)])
def test_stratified_folds_share_et_free_cases_and_volumes(num_cases, num_et_free, num_folds):
    ids, strata = stratified_ids(num_cases, num_et_free)
    folds = assign_folds(ids, num_folds, seed=0, strata=strata)
    assert sorted(folds) == sorted(ids)
    sizes = Counter(folds.values())
    assert len(sizes) == num_folds and max(sizes.values()) - min(sizes.values()) <= 1
    et_free = Counter(folds[case] for case in ids if not strata[case][0])
    # every fold has its even share of ET-free cases to within one (none short by more when there are fewer)
    assert all(num_et_free // num_folds <= et_free[fold] <= -(-num_et_free // num_folds) for fold in range(num_folds))
    for tertile in range(3):
        counts = [sum(folds[c] == fold and strata[c][1] == tertile for c in ids) for fold in range(num_folds)]
        assert max(counts) - min(counts) <= 2, (tertile, counts)
    for stratum in set(strata.values()):  # each stratum itself is dealt evenly, however small
        dealt = Counter(folds[case] for case in ids if strata[case] == stratum)
        assert max(dealt.values()) - min(dealt.get(fold, 0) for fold in range(num_folds)) <= 1


def test_stratified_folds_reproducible_for_a_seed():
    ids, strata = stratified_ids(40, 7)
    folds = assign_folds(ids, 5, seed=3, strata=strata)
    assert assign_folds(list(reversed(ids)), 5, seed=3, strata=dict(reversed(strata.items()))) == folds
    assert assign_folds(ids, 5, seed=4, strata=strata) != folds
    # pinned for seed 3: the folds depend on nothing but the ids, strata and seed (no hash order, no threads)
    assert [folds[case] for case in ids[:12]] == [0, 4, 0, 3, 4, 3, 2, 3, 1, 2, 0, 1]


def stratified_dataset(root: Path, volumes: list[int], et_free: set[int]) -> Path:
    """Tiny training cases whose segmentation holds `volumes[i]` tumour voxels (label 2 then 1), one of them ET (3)
    unless i is in `et_free`."""
    for index, volume in enumerate(volumes):
        case_dir = tiny_case(root / TRAINING_FOLDER, index + 1)
        seg = np.zeros(np.prod(TINY), np.uint8)
        seg[:volume] = 2
        seg[0] = 1 if index in et_free else 3
        save_like(case_dir, "seg", seg.reshape(TINY))
    return root


def test_datalist_folds_are_stratified_and_record_et_and_volume(tmp_path, capsys):
    volumes = [10 + 3 * n for n in range(20)]
    et_free = {0, 4, 9, 13, 17}
    root = stratified_dataset(tmp_path / "data", volumes, et_free)
    output = tmp_path / "datalist.json"
    fire.Fire(main, command=["--dataset_dir", str(root), "--output", str(output), "--num_folds", "4", "--seed", "1"])
    datalist = json.loads(output.read_text())
    entries = {int(Path(entry["label"]).parent.name[10:15]) - 1: entry for entry in datalist["training"]}
    assert {index: (entry["has_et"], entry["tumour_voxels"]) for index, entry in entries.items()} == {
        index: (index not in et_free, volume) for index, volume in enumerate(volumes)
    }
    assert sorted(Counter(entry["fold"] for entry in entries.values()).values()) == [5, 5, 5, 5]
    assert sorted(Counter(entries[index]["fold"] for index in et_free).values()) == [1, 1, 1, 2]
    assert make_datalist(root, num_folds=4, seed=1)[0] == datalist
    assert make_datalist(root, num_folds=4, seed=2)[0] != datalist
    # monai reads the datalist as before; the new keys pass through as they are
    loaded = load_decathlon_datalist(output, data_list_key="training", base_dir=root)
    assert [(item["has_et"], item["tumour_voxels"]) for item in loaded] == [
        (entry["has_et"], entry["tumour_voxels"]) for entry in datalist["training"]
    ]
    printed = capsys.readouterr().out
    table = fold_table(datalist["training"], 4)
    assert table[0].split() == ["fold", "cases", "ET-free", "WT", "10-28", "WT", "31-49", "WT", "52-67"]
    assert "\n".join(f"  {line}" for line in table) in printed
    rows = [list(map(int, line.split())) for line in table[1:]]
    assert [row[0] for row in rows] == [0, 1, 2, 3] and all(row[1] == sum(row[3:]) == 5 for row in rows)
    assert sorted(row[2] for row in rows) == [1, 1, 1, 2]


def test_fold_table_of_an_older_datalist_counts_cases_only():
    training = [{"label": f"{n}/seg.nii.gz", "fold": n % 2} for n in range(5)]
    assert [line.split() for line in fold_table(training, 2)] == [
        ["fold", "cases", "ET-free", "WT", "-", "WT", "-", "WT", "-"],
        ["0", "3", "0", "0", "0", "0"],
        ["1", "2", "0", "0", "0", "0"],
    ]


@pytest.mark.parametrize("num_folds", [1, 6])
def test_fold_count_must_fit_the_cases(num_folds):
    with pytest.raises(ValueError, match="num_folds"):
        assign_folds(["a", "b", "c", "d", "e"], num_folds, seed=0)


DEFECTS = ["missing modality", "shape", "affine", "label 4", "garbage", "truncated", "no seg in training folder"]
DEFECTS += ["non-finite voxels", "all-zero modality"]


@pytest.mark.parametrize("defect", DEFECTS)
def test_bad_case_is_named_and_left_out(tmp_path, defect):
    root = tiny_dataset(tmp_path, 5, 1)
    bad_dir = root / TRAINING_FOLDER / "BraTS-PED-00007-000"
    file_name, reason = break_case(bad_dir, defect)
    datalist, problems = make_datalist(root, num_folds=2, label_scheme="brats2023_ped")
    assert len(problems) == 1
    assert problems[0].startswith("BraTS-PED-00007-000: ")
    assert file_name in problems[0] and reason in problems[0]
    listed = [Path(entry["label"]).parent.name for entry in datalist["training"]]
    assert "BraTS-PED-00007-000" not in listed and len(listed) == 4
    assert len(datalist["testing"]) == 1


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
    command = ["--dataset_dir", str(root), "--output", str(output), "--num_folds", "5"]
    fire.Fire(main, command=[*command, "--label_scheme", "brats2023_ped"])
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


def test_empty_folder_is_an_input_error_naming_it(tmp_path):
    with pytest.raises(InputError, match=f"no case folders under {tmp_path}"):
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
    with pytest.raises(InputError, match=r"fold 3 .*datalist\.json.*\[0, 1, 2\]"):
        fold_split(path, root, fold=3)


def test_problems_come_in_case_order_whichever_check_finishes_first(tmp_path, monkeypatch):
    root = tiny_dataset(tmp_path, 8, 0)
    defects = {1: "label 4", 7: "non-finite voxels", 13: "shape", 19: "all-zero modality", 22: "garbage"}
    for number, defect in defects.items():
        break_case(root / TRAINING_FOLDER / f"BraTS-PED-{number:05d}-000", defect)
    _, problems = make_datalist(root, num_folds=2, label_scheme="brats2023_ped")
    assert [line.split(": ", 1)[0] for line in problems] == [f"BraTS-PED-{n:05d}-000" for n in defects]
    monkeypatch.setattr(prepare_datalist, "SCAN_THREADS", 1)
    assert make_datalist(root, num_folds=2, label_scheme="brats2023_ped")[1] == problems


def test_every_unused_folder_is_reported_and_counted_as_left_out(tmp_path, capsys):
    """Folders that are not cases and cases of other BraTS cohorts are named with the reason, never skipped
    silently; a non-BraTS case id is still a case, and hidden folders are not looked at."""
    root = tiny_dataset(tmp_path / "data", 4, 1)
    training = root / TRAINING_FOLDER
    old = write_old_case(training / "BraTS2021_00001", "BraTS2021_00001")
    misnamed = tiny_case(training, 50, case_id="BraTS-GLI-00050-000").rename(training / "BraTS-PED-00050-000")
    adult = tiny_case(training, 13, case_id="BraTS-GLI-00013-000")
    (root / "empty").mkdir()
    tiny_case(training, 0, case_id="patient01")
    tiny_case(root / ".trash", 99)
    output = tmp_path / "datalist.json"
    fire.Fire(main, command=["--dataset_dir", str(root), "--output", str(output), "--num_folds", "5"])
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"BraTS-PED-00050-000: {misnamed}: files are named for case BraTS-GLI-00050-000 "
        "(e.g. BraTS-GLI-00050-000-seg.nii.gz), not for the folder BraTS-PED-00050-000: "
        "a case folder and its files carry the same case id",
        f"BraTS2021_00001: {old}: files have BraTS 2018-2021 names (e.g. BraTS2021_00001_flair.nii.gz); "
        "BraTS 2023 names are expected: BraTS2021_00001-{t1c,t1n,t2f,t2w,seg}.nii.gz "
        "(t1ce -> t1c, t1 -> t1n, flair -> t2f, t2 -> t2w)",
        f"empty: {root / 'empty'}: no NIfTI files (.nii.gz or .nii)",
        f"BraTS-GLI-00013-000: {adult}: case from the BraTS GLI cohort, not pediatric (PED): left out",
    ]
    assert captured.out.splitlines()[-1] == (
        "4 left out with problems: BraTS-GLI-00013-000, BraTS-PED-00050-000, BraTS2021_00001, empty"
    )
    training_ids = sorted(Path(entry["label"]).parent.name for entry in json.loads(output.read_text())["training"])
    assert training_ids == [*(f"BraTS-PED-{n:05d}-000" for n in (1, 4, 7, 10)), "patient01"]


def test_only_folders_that_are_not_cases_is_an_error_listing_them(tmp_path):
    old = write_old_case(tmp_path / "BraTS2021_00001", "BraTS2021_00001")
    with pytest.raises(InputError) as caught:
        make_datalist(tmp_path)
    assert len(caught.value.problems) == 2
    assert caught.value.problems[0].startswith(f"no case folders under {tmp_path}: ")
    assert caught.value.problems[1].startswith(f"BraTS2021_00001: {old}: files have BraTS 2018-2021 names")


def test_nii_cases_are_listed_and_split(tmp_path):
    root = tiny_dataset(tmp_path, 4, 0)
    case_dir = root / TRAINING_FOLDER / "BraTS-PED-00004-000"
    for path in case_dir.iterdir():
        nib.save(nib.load(path), str(path)[: -len(".gz")])
        path.unlink()
    datalist, problems = make_datalist(root, num_folds=2)
    assert problems == []
    (entry,) = [entry for entry in datalist["training"] if "00004" in entry["label"]]
    assert entry["image"] == [f"{TRAINING_FOLDER}/BraTS-PED-00004-000/BraTS-PED-00004-000-{m}.nii" for m in MODALITIES]
    train, val = fold_split(datalist, root, fold=entry["fold"])
    assert "BraTS-PED-00004-000" in {case["case"] for case in val}
    assert len(train) + len(val) == 4


def test_strict_error_is_an_input_error_with_every_problem(tmp_path):
    root = tiny_dataset(tmp_path, 6, 0)
    break_case(root / TRAINING_FOLDER / "BraTS-PED-00004-000", "non-finite voxels")
    (root / "empty").mkdir()
    with pytest.raises(DatasetError) as caught:
        make_datalist(root, strict=True)
    assert isinstance(caught.value, InputError)
    assert [line.split(": ", 1)[0] for line in caught.value.problems] == ["empty", "BraTS-PED-00004-000"]


def test_missing_dataset_folder_is_reported_by_the_command(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fire.Fire(main, command=["--dataset_dir", str(tmp_path / "nowhere"), "--output", str(tmp_path / "d.json")])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == f"error: dataset folder not found: {tmp_path / 'nowhere'}\n"


def test_debugging_shows_the_commands_error_with_its_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv(DEBUG_VARIABLE, "1")
    with pytest.raises(InputError, match="dataset folder not found"):
        fire.Fire(main, command=["--dataset_dir", str(tmp_path / "nowhere"), "--output", str(tmp_path / "d.json")])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "datalist not found: {path}"),
        ("{not json", "{path} is not valid JSON"),
        ("[]", "{path} should hold a JSON object"),
        ('{"training": [{"image": [], "label": ""}]}', "datalist {path} has training entries without 'fold'"),
    ],
)
def test_unusable_datalist_is_an_input_error_naming_it(tmp_path, content, message):
    path = tmp_path / "datalist.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError) as caught:
        fold_split(path, tmp_path, fold=0)
    assert caught.value.problems[0].startswith(message.format(path=path))


def test_datalist_older_than_the_data_fails_with_every_problem(synthetic_dataset, synthetic_datalist, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(synthetic_dataset, root)
    train, val = fold_split(synthetic_datalist, root, fold=0)
    deleted, truncated, regridded = (train[0]["image"][1], val[1]["label"], train[2]["image"][2])
    os.remove(deleted)
    Path(truncated).write_bytes(Path(truncated).read_bytes()[:-200])
    image = nib.load(regridded)
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj)[::2], image.affine), regridded)
    with pytest.raises(InputError) as caught:
        fold_split(synthetic_datalist, root, fold=0)
    *problems, hint = caught.value.problems
    assert sorted(problems) == sorted(
        [
            f"{train[0]['case']}: {deleted}: missing",
            f"{val[1]['case']}: {truncated}: unreadable (EOFError: Compressed file ended before the end-of-stream "
            "marker was reached)",
            f"{train[2]['case']}: {regridded}: shape (32, 64, 40) differs from {train[2]['case']}-t1c.nii.gz "
            "(64, 64, 40)",
        ]
    )
    assert hint == (
        f"the datalist {synthetic_datalist} no longer matches the data in {root}: rebuild it with "
        f"python -m scripts.prepare_datalist --dataset_dir {root} --output {synthetic_datalist}"
    )


def test_fold_split_reads_headers_only(tmp_path):
    """Voxel values are the datalist command's and the loading transform's business: splitting stays cheap."""
    root = tiny_dataset(tmp_path, 4, 0)
    datalist, _ = make_datalist(root, num_folds=2)
    save_like(root / TRAINING_FOLDER / "BraTS-PED-00004-000", "t1c", np.full(TINY, np.nan, np.float32))
    train, val = fold_split(datalist, root, fold=0)
    assert len(train) + len(val) == 4


def seg_values(*label_sets: tuple[int, ...]) -> dict[str, set[int]]:
    """{seg path: distinct values} as a scan finds them, one case per label set."""
    return {
        f"/data/BraTS-PED-{number:05d}-000/BraTS-PED-{number:05d}-000-seg.nii.gz": {0, *labels}
        for number, labels in enumerate(label_sets, start=1)
    }


@pytest.mark.parametrize(
    ("label_sets", "scheme", "reason"),
    [
        (
            [(1, 2, 3), (1, 2), (2, 3)],
            "brats2023_ped",
            "label values [0, 1, 2, 3] found, which the default brats2023_ped fits; brats2024_ped without ED (4) "
            "would look the same: --label_scheme chooses another",
        ),
        (
            [(1, 2, 3, 4), (2, 4), (1, 2, 3, 4), (1, 2)],
            "brats2024_ped",
            "label values [0, 1, 2, 3, 4] found; 3 and 4 occur together in 2 case(s)",
        ),
        (
            [(1, 2)],
            "brats2023_ped",
            "label values [0, 1, 2] found, which the default brats2023_ped fits; brats2024_ped without CC (3), ED (4), "
            "brats2021 without ET (4) would look the same: --label_scheme chooses another",
        ),
        ([], "brats2023_ped", "no segmentations to tell it from: the default"),
    ],
)
def test_detection_picks_the_scheme_and_says_why(label_sets, scheme, reason):
    assert detect_label_scheme(seg_values(*label_sets)) == (scheme, reason)


def test_detection_refuses_four_without_three_as_ambiguous():
    with pytest.raises(LabelSchemeError) as caught:
        detect_label_scheme(seg_values((1, 2, 4), (2, 4)))
    assert caught.value.problems == [
        "label values [0, 1, 2, 4] fit several label schemes alike: brats2024_ped without CC (3) "
        "(BraTS-PEDs 2024 and later); brats2021 (BraTS 2018-2021 (adult glioma)); say which with "
        "--label_scheme brats2024_ped or --label_scheme brats2021"
    ]


def test_detection_refuses_a_mix_of_2023_and_2021_cases_with_examples_of_each():
    """Together they hold 3 and 4, as 2024 data does, but no single case does."""
    values = seg_values((1, 2, 3), (1, 2, 4), (1, 2, 3), (1, 2), (2, 3), (1, 2, 3), (4,))
    with pytest.raises(LabelSchemeError) as caught:
        detect_label_scheme(values)
    assert caught.value.problems[:-1] == [
        "label values [0, 1, 2, 3, 4] found, in cases that look like a mix of label schemes:",
        "4 case(s) with label values [0, 1, 2, 3] (they fit brats2023_ped or brats2024_ped), "
        "e.g. BraTS-PED-00001-000, BraTS-PED-00003-000, BraTS-PED-00005-000",
        "2 case(s) with label values [0, 1, 2, 4] (they fit brats2024_ped or brats2021), "
        "e.g. BraTS-PED-00002-000, BraTS-PED-00007-000",
    ]
    assert "--label_scheme" in caught.value.problems[-1]


def test_detection_lists_every_segmentation_whose_values_fit_no_scheme():
    values = seg_values((1, 2, 3), (1, 5), (1, 2, 3), (3, 4, 7))
    with pytest.raises(LabelSchemeError) as caught:
        detect_label_scheme(values)
    paths = list(values)
    assert caught.value.problems[:-1] == [
        f"BraTS-PED-00002-000: {paths[1]}: label values [0, 1, 5] fit no label scheme",
        f"BraTS-PED-00004-000: {paths[3]}: label values [0, 3, 4, 7] fit no label scheme",
    ]
    assert caught.value.problems[-1].startswith(
        "label schemes: brats2023_ped [0, 1, 2, 3]; brats2024_ped [0, 1, 2, 3, 4]; brats2021 [0, 1, 2, 4]; "
        "fix the segmentations listed, or pass --label_scheme"
    )


def test_command_line_detects_2024_labels_and_records_them(tmp_path, capsys):
    root = tiny_dataset(tmp_path / "data", 4, 1, labels=(1, 2, 3, 4))
    tiny_case(root / TRAINING_FOLDER, 40, labels=(1, 2, 4))  # a case without a cyst
    output = tmp_path / "datalist.json"
    fire.Fire(main, command=["--dataset_dir", str(root), "--output", str(output), "--num_folds", "2"])
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.splitlines()[0] == (
        "label scheme: brats2024_ped (label values [0, 1, 2, 3, 4] found; 3 and 4 occur together in 4 case(s))"
    )
    datalist = json.loads(output.read_text())
    assert datalist["label_scheme"] == "brats2024_ped"
    assert len(datalist["training"]) == 5 and len(datalist["testing"]) == 1


def test_command_line_refuses_a_mix_unless_the_scheme_is_given(tmp_path, capsys):
    root = tiny_dataset(tmp_path / "data", 4, 0)
    old = tiny_case(root / TRAINING_FOLDER, 40, labels=(1, 2, 4))
    output = tmp_path / "datalist.json"
    command = ["--dataset_dir", str(root), "--output", str(output), "--num_folds", "2"]
    with pytest.raises(SystemExit) as exit_info:
        fire.Fire(main, command=command)
    assert exit_info.value.code == 1 and not output.exists()
    err = capsys.readouterr().err
    assert err.startswith("error: label values [0, 1, 2, 3, 4] found, in cases that look like a mix of label schemes")
    assert "e.g. BraTS-PED-00040-000" in err

    fire.Fire(main, command=[*command, "--label_scheme", "brats2023_ped"])
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"BraTS-PED-00040-000: {old}/BraTS-PED-00040-000-seg.nii.gz: label values [4] outside [0, 1, 2, 3] "
        "(brats2023_ped: BraTS 2023 (pediatric and adult)); they fit --label_scheme brats2024_ped or brats2021"
    ]
    assert captured.out.splitlines()[0] == "label scheme: brats2023_ped (given with --label_scheme)"
    datalist = json.loads(output.read_text())
    assert datalist["label_scheme"] == "brats2023_ped" and len(datalist["training"]) == 4

    datalist, problems = make_datalist(root, num_folds=2, label_scheme="brats2024_ped")
    assert problems == [] and datalist["label_scheme"] == "brats2024_ped" and len(datalist["training"]) == 5


def test_four_without_three_needs_the_scheme_named(tmp_path):
    root = tiny_dataset(tmp_path, 4, 0, labels=(1, 2, 4))
    with pytest.raises(LabelSchemeError, match="fit several label schemes alike"):
        make_datalist(root, num_folds=2)
    datalist, problems = make_datalist(root, num_folds=2, label_scheme="brats2021")
    assert problems == [] and datalist["label_scheme"] == "brats2021"


def test_values_that_fit_no_scheme_stop_detection_but_a_given_scheme_leaves_the_case_out(tmp_path):
    root = tiny_dataset(tmp_path, 4, 0)
    bad = tiny_case(root / TRAINING_FOLDER, 40, labels=(1, 5))
    with pytest.raises(LabelSchemeError) as caught:
        make_datalist(root, num_folds=2)
    assert caught.value.problems[0] == (
        f"BraTS-PED-00040-000: {bad}/BraTS-PED-00040-000-seg.nii.gz: label values [0, 1, 5] fit no label scheme"
    )
    datalist, problems = make_datalist(root, num_folds=2, label_scheme="brats2023_ped")
    assert [line.split(": ", 1)[0] for line in problems] == ["BraTS-PED-00040-000"]
    assert "label values [5] outside [0, 1, 2, 3]" in problems[0] and len(datalist["training"]) == 4


def test_unknown_label_scheme_is_refused_before_the_scan(tmp_path):
    with pytest.raises(InputError, match="unknown label_scheme 'brats2024'"):
        make_datalist(tmp_path / "nowhere", label_scheme="brats2024")


def test_fold_split_refuses_a_datalist_of_another_scheme(tmp_path):
    root = tiny_dataset(tmp_path, 4, 0, labels=(1, 2, 3, 4))
    datalist, _ = make_datalist(root, num_folds=2)
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(datalist))
    train, val = fold_split(path, root, fold=0, label_scheme="brats2024_ped")
    assert len(train) + len(val) == 4
    with pytest.raises(InputError) as caught:
        fold_split(path, root, fold=0, label_scheme="brats2023_ped")
    assert caught.value.problems == [
        f"datalist {path} holds brats2024_ped labels, but label_scheme is brats2023_ped: set label_scheme to "
        f"brats2024_ped, or rebuild the datalist with python -m scripts.prepare_datalist --dataset_dir {root} "
        f"--output {path} --label_scheme brats2023_ped"
    ]


def test_a_datalist_without_a_scheme_holds_2023_labels(tmp_path):
    """Datalists written before the key existed were all checked against the 2023 labels."""
    root = tiny_dataset(tmp_path, 4, 0)
    datalist, _ = make_datalist(root, num_folds=2)
    del datalist["label_scheme"]
    for label_scheme in ("brats2023_ped", None):
        train, val = fold_split(datalist, root, fold=1, label_scheme=label_scheme)
        assert len(train) + len(val) == 4
    with pytest.raises(InputError, match="<datalist dict> holds brats2023_ped labels, but label_scheme is brats2021"):
        fold_split(datalist, root, fold=1, label_scheme="brats2021")


@pytest.mark.parametrize(
    "names", [("Training", "Validation"), ("BraTS2024-PEDs-Training", "BraTS2024-PEDs-Validation")]
)
def test_2024_release_layout_is_listed(tmp_path, names):
    training, validation = (tmp_path / name for name in names)
    for number in (1, 5, 9):
        tiny_case(training, number, labels=(1, 2, 3, 4))
    unlabelled = tiny_case(training, 13, with_seg=False)
    for number in (20, 22):
        tiny_case(validation, number, with_seg=False)
    datalist, problems = make_datalist(tmp_path, num_folds=3)
    assert problems == [
        f"BraTS-PED-00013-000: {unlabelled}/BraTS-PED-00013-000-seg.nii.gz: missing "
        "(cases in the training folder need one)"
    ]
    assert datalist["label_scheme"] == "brats2024_ped"
    assert [entry["label"] for entry in datalist["training"]] == [
        f"{names[0]}/BraTS-PED-{n:05d}-000/BraTS-PED-{n:05d}-000-seg.nii.gz" for n in (1, 5, 9)
    ]
    assert [entry["image"][0] for entry in datalist["testing"]] == [
        f"{names[1]}/BraTS-PED-{n:05d}-000/BraTS-PED-{n:05d}-000-t1c.nii.gz" for n in (20, 22)
    ]
