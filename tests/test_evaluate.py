"""The evaluation command: pairing folders, refusing bad inputs up front, and the files it writes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts.errors import InputError
from scripts.evaluate import EvaluationInputError, evaluate_cases, evaluate_folders, main
from scripts.metrics import METRIC_NAMES

SHAPE = (16, 16, 12)
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])
PER_CASE_HEADER = (
    "case,region,legacy_dice,legacy_hd95,lesionwise_dice,lesionwise_hd95,num_tp,num_fp,num_fn,"
    "sensitivity,specificity,gt_volume"
)
REPO_ROOT = Path(__file__).resolve().parents[1]

# What an evaluation writes to its output folder.
EVALUATION_FILES = ["boxplots.png", "metrics_per_case.csv", "report.md", "summary.csv", "summary.json"]


def tumour(et_label: int = 3) -> np.ndarray:
    """Edema shell around a core whose centre is enhancing (``et_label``), 64 voxels of TC, 216 of WT."""
    label = np.zeros(SHAPE, np.uint8)
    label[4:10, 4:10, 3:9] = 2
    label[5:9, 5:9, 4:8] = 1
    label[6:8, 6:8, 5:7] = et_label
    return label


def save(path: Path, label: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(label, affine), path)
    return path


def brats_layout(root: Path, cases: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[Path, Path]:
    """pred/<case>.nii.gz and gt/<case>/<case>-seg.nii.gz for each case's (prediction, GT)."""
    for case, (pred, gt) in cases.items():
        save(root / "pred" / f"{case}.nii.gz", pred)
        save(root / "gt" / case / f"{case}-seg.nii.gz", gt)
    return root / "pred", root / "gt"


def read_csv(path: Path) -> tuple[str, list[dict]]:
    text = path.read_text()
    return text.splitlines()[0], list(csv.DictReader(text.splitlines()))


def test_writes_per_case_metrics_and_summaries(tmp_path):
    # Case 1 is perfect; case 2 calls its enhancing voxels core, so ET legacy Dice is 1 and 0 over the two cases:
    # mean 0.5, population std 0.5, median 0.5, quartiles 0.25 and 0.75. TC and WT are perfect in both.
    pred_dir, gt_dir = brats_layout(
        tmp_path, {"BraTS-PED-00001-000": (tumour(), tumour()), "BraTS-PED-00002-000": (tumour(et_label=1), tumour())}
    )
    summary = evaluate_folders(str(pred_dir), str(gt_dir), str(tmp_path / "out"))

    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == EVALUATION_FILES
    report = (out / "report.md").read_text()
    # Both score 1 lesion-wise (the 8 mm^3 ET lesion is below the lesion-wise threshold): listed by case id.
    assert report.index("| 1 | BraTS-PED-00001-000 | 1.0000 |") < report.index("| 2 | BraTS-PED-00002-000 | 1.0000 |")
    assert "| ET | legacy Dice | 0.5000 ± 0.5000 | 0.5000 |" in report
    header, rows = read_csv(out / "metrics_per_case.csv")
    assert header == PER_CASE_HEADER
    assert [(row["case"][-9:], row["region"]) for row in rows] == [
        (case, region) for case in ("00001-000", "00002-000") for region in ("ET", "TC", "WT")
    ]
    assert [float(row["legacy_dice"]) for row in rows] == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert [float(row["gt_volume"]) for row in rows[:3]] == [8.0, 64.0, 216.0]

    et_dice = summary["regions"]["ET"]["legacy_dice"]
    assert et_dice == {"mean": 0.5, "std": 0.5, "median": 0.5, "p25": 0.25, "p75": 0.75}
    assert summary["regions"]["WT"]["lesionwise_dice"]["mean"] == 1.0
    assert (summary["num_cases"], summary["challenge"]) == (2, "PED")
    assert json.loads((out / "summary.json").read_text()) == summary

    summary_header, summary_rows = read_csv(out / "summary.csv")
    assert summary_header == "region,metric,mean,std,median,p25,p75"
    assert [(row["region"], row["metric"]) for row in summary_rows] == [
        (region, metric) for region in ("ET", "TC", "WT") for metric in METRIC_NAMES
    ]
    assert float(summary_rows[0]["p75"]) == 0.75


@pytest.mark.parametrize("gt_name", ["{case}-seg.nii.gz", "{case}.nii.gz"])
def test_flat_ground_truth_folder(tmp_path, gt_name):
    case = "BraTS-PED-00003-000"
    save(tmp_path / "pred" / f"{case}.nii.gz", tumour())
    save(tmp_path / "gt" / gt_name.format(case=case), tumour())
    summary = evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "gt"), str(tmp_path / "out"))
    assert summary["num_cases"] == 1
    assert summary["regions"]["TC"]["legacy_dice"]["mean"] == 1.0


def test_voxel_spacing_comes_from_the_header(tmp_path):
    case = "BraTS-PED-00004-000"
    anisotropic = np.diag([1.0, 1.0, 2.5, 1.0])
    pairs = [
        (
            case,
            str(save(tmp_path / f"{case}.nii.gz", tumour(), anisotropic)),
            str(save(tmp_path / f"{case}-seg.nii.gz", tumour(), anisotropic)),
        )
    ]
    summary = evaluate_cases(pairs, str(tmp_path / "out"))
    assert summary["regions"]["TC"]["gt_volume"]["mean"] == 64 * 2.5


def test_unpaired_and_mismatched_cases_are_all_reported_before_scoring(tmp_path):
    pred_dir, gt_dir = brats_layout(tmp_path, {"BraTS-PED-00005-000": (np.zeros((16, 16, 10), np.uint8), tumour())})
    save(pred_dir / "BraTS-PED-00006-000.nii.gz", tumour())  # no ground truth
    save(gt_dir / "BraTS-PED-00007-000" / "BraTS-PED-00007-000-seg.nii.gz", tumour())  # no prediction
    with pytest.raises(EvaluationInputError) as caught:
        evaluate_folders(str(pred_dir), str(gt_dir), str(tmp_path / "out"))
    problems = caught.value.problems
    assert len(problems) == 3
    assert any("BraTS-PED-00005-000" in p and "shape" in p for p in problems)
    assert any("BraTS-PED-00006-000" in p and "no ground truth" in p for p in problems)
    assert any("BraTS-PED-00007-000" in p and "no prediction" in p for p in problems)
    assert all(p in str(caught.value) for p in problems)
    assert not (tmp_path / "out").exists()


def test_affine_mismatch_names_the_case(tmp_path):
    case = "BraTS-PED-00008-000"
    shifted = AFFINE.copy()
    shifted[0, 3] = 5.0
    pairs = [(case, str(save(tmp_path / "p.nii.gz", tumour(), shifted)), str(save(tmp_path / "g.nii.gz", tumour())))]
    with pytest.raises(EvaluationInputError, match=f"{case}: prediction affine"):
        evaluate_cases(pairs, str(tmp_path / "out"))


def test_unknown_challenge_or_label_scheme_is_refused(tmp_path):
    with pytest.raises(
        InputError, match="unknown challenge 'BraTS-XYZ'; valid names: PED, GLI, SSA, MEN, MET, PED2024"
    ):
        evaluate_cases([], str(tmp_path / "out"), challenge="BraTS-XYZ")
    with pytest.raises(InputError, match="unknown label_scheme 'brats2025'; valid: brats2023_ped, brats2024_ped"):
        evaluate_folders(str(tmp_path), str(tmp_path), str(tmp_path / "out"), label_scheme="brats2025")
    assert not (tmp_path / "out").exists()


def test_command_line_prints_a_summary_table(tmp_path, capsys):
    pred_dir, gt_dir = brats_layout(tmp_path, {"BraTS-PED-00009-000": (tumour(et_label=1), tumour())})
    main(pred_dir=str(pred_dir), gt_dir=str(gt_dir), output_dir=str(tmp_path / "out"), challenge="PED")
    lines = capsys.readouterr().out.splitlines()
    # ET is missed (legacy 0), but its 8 mm^3 lesion is below 50 mm^3: nothing to score lesion-wise, which gives 1.
    assert lines[-3].split() == ["ET", "0.0000", "1.0000"]
    assert lines[-1].split() == ["WT", "1.0000", "1.0000"]


def test_command_line_error_is_readable_and_exits_non_zero(tmp_path):
    pred_dir, gt_dir = brats_layout(tmp_path, {"BraTS-PED-00010-000": (tumour(), tumour())})
    (pred_dir / "BraTS-PED-00010-000.nii.gz").unlink()
    command = [sys.executable, "-m", "scripts.evaluate", "--pred_dir", str(pred_dir), "--gt_dir", str(gt_dir)]
    result = subprocess.run(
        [*command, "--output_dir", str(tmp_path / "out")], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "BraTS-PED-00010-000" in result.stderr and "no prediction" in result.stderr
    assert "Traceback" not in result.stderr


def test_input_problems_are_an_input_error_listing_each_problem(tmp_path):
    pred_dir, gt_dir = brats_layout(tmp_path, {"BraTS-PED-00011-000": (tumour(), tumour())})
    (gt_dir / "BraTS-PED-00011-000" / "BraTS-PED-00011-000-seg.nii.gz").unlink()
    with pytest.raises(InputError) as caught:
        evaluate_folders(str(pred_dir), str(gt_dir), str(tmp_path / "out"))
    problem = (
        f"BraTS-PED-00011-000: prediction {pred_dir / 'BraTS-PED-00011-000.nii.gz'} has no ground truth in {gt_dir}"
    )
    assert caught.value.problems == [problem]
    assert str(caught.value) == f"cannot evaluate, 1 problem(s):\n  - {problem}"
    assert isinstance(caught.value, EvaluationInputError) and isinstance(caught.value, ValueError)


def save_scaled(path: Path, label: np.ndarray, slope: float) -> Path:
    """Integer storage whose scl_slope makes nibabel return ``label * slope`` as floats."""
    image = nib.Nifti1Image(label, AFFINE)
    image.header.set_slope_inter(slope, 0.0)
    nib.save(image, path)
    return path


@pytest.mark.parametrize("entry", ["folders", "cases"])
def test_values_that_are_not_2023_labels_are_all_reported_before_anything_is_written(tmp_path, entry):
    out_of_scheme = tumour()
    out_of_scheme[0, 0, 0], out_of_scheme[1, 0, 0] = 4, 255
    cases = {
        "BraTS-PED-00012-000": (out_of_scheme, tumour()),
        "BraTS-PED-00013-000": (tumour() + np.float32(0.4), tumour()),
        "BraTS-PED-00014-000": (tumour(), tumour(et_label=4)),  # 2018-2021 ground truth: ET = 4
        "BraTS-PED-00015-000": (tumour(), tumour()),
    }
    pred_dir, gt_dir = brats_layout(tmp_path, cases)
    save_scaled(pred_dir / "BraTS-PED-00015-000.nii.gz", tumour(), slope=1.4)
    pred = {case: pred_dir / f"{case}.nii.gz" for case in cases}
    gt = {case: gt_dir / case / f"{case}-seg.nii.gz" for case in cases}

    with pytest.raises(EvaluationInputError) as caught:
        if entry == "folders":
            evaluate_folders(str(pred_dir), str(gt_dir), str(tmp_path / "out"))
        else:
            evaluate_cases([(case, str(pred[case]), str(gt[case])) for case in cases], str(tmp_path / "out"))

    outside = "outside [0, 1, 2, 3] (brats2023_ped: BraTS 2023 (pediatric and adult))"
    assert caught.value.problems == [
        f"BraTS-PED-00012-000: prediction {pred['BraTS-PED-00012-000']}: label values [4, 255] {outside}",
        f"BraTS-PED-00013-000: prediction {pred['BraTS-PED-00013-000']}: non-integer label values [0.4, 1.4, 2.4, 3.4]",
        f"BraTS-PED-00014-000: ground truth {gt['BraTS-PED-00014-000']}: label values [4] {outside}; "
        "they fit --label_scheme brats2024_ped or brats2021",
        f"BraTS-PED-00015-000: prediction {pred['BraTS-PED-00015-000']}: non-integer label values [1.4, 2.8, 4.2]",
    ]
    assert str(caught.value).startswith("cannot evaluate, 4 problem(s):\n  - BraTS-PED-00012-000: prediction ")
    assert not (tmp_path / "out").exists()


def test_command_line_refuses_out_of_scheme_labels_without_a_traceback(tmp_path):
    pred_dir, gt_dir = brats_layout(tmp_path, {"BraTS-PED-00016-000": (tumour(), tumour(et_label=4))})
    command = [sys.executable, "-m", "scripts.evaluate", "--pred_dir", str(pred_dir), "--gt_dir", str(gt_dir)]
    result = subprocess.run(
        [*command, "--output_dir", str(tmp_path / "out")], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode != 0
    gt_file = gt_dir / "BraTS-PED-00016-000" / "BraTS-PED-00016-000-seg.nii.gz"
    assert f"  - BraTS-PED-00016-000: ground truth {gt_file}: label values [4] outside [0, 1, 2, 3]" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_whole_valued_float_labels_are_scored(tmp_path):
    # MONAI savers may store labels as float32; 0.0-3.0 are still labels.
    pred_dir, gt_dir = brats_layout(tmp_path, {"BraTS-PED-00017-000": (tumour().astype(np.float32), tumour())})
    summary = evaluate_folders(str(pred_dir), str(gt_dir), str(tmp_path / "out"))
    assert summary["regions"]["ET"]["legacy_dice"]["mean"] == 1.0


def test_hidden_files_and_folders_are_ignored(tmp_path):
    # An interrupted inference leaves its atomic-write temporaries (hidden names) beside the outputs.
    case = "BraTS-PED-00018-000"
    pred_dir, gt_dir = brats_layout(tmp_path, {case: (tumour(), tumour())})
    save(pred_dir / f".{case}.nii.gz.partial.4242.0123abcd.x7k2q9.nii.gz", tumour(et_label=9))
    save(gt_dir / f".{case}-seg.nii.gz.partial.4242.0123abcd.p3m8z1.nii.gz", tumour(et_label=9))
    save(gt_dir / f".{case}" / f".{case}-seg.nii.gz", tumour(et_label=9))

    summary = evaluate_folders(str(pred_dir), str(gt_dir), str(tmp_path / "out"))

    assert summary["num_cases"] == 1
    assert summary["regions"]["ET"]["legacy_dice"]["mean"] == 1.0
    _, rows = read_csv(tmp_path / "out" / "metrics_per_case.csv")
    assert {row["case"] for row in rows} == {case}


# ---- the 2024+ BraTS-PEDs labels (1 ET, 2 NET, 3 CC, 4 ED) and the official 2024 rules ----

REGIONS_2024 = ("ET", "TC", "WT", "NETC", "CC", "ED")


def tumour_2024(swap_cyst: bool = False) -> np.ndarray:
    """Edema shell (1056 voxels) around a core of cyst (144) and non-enhancing tumour (168) holding enhancing tumour
    (72); ``swap_cyst`` labels the cyst non-enhancing and the non-enhancing tumour cyst."""
    cyst, non_enhancing = (2, 3) if swap_cyst else (3, 2)
    label = np.zeros(SHAPE, np.uint8)
    label[2:14, 2:14, 1:11] = 4
    label[4:12, 4:12, 3:9] = non_enhancing
    label[4:7, 4:12, 3:9] = cyst
    label[8:11, 5:11, 4:8] = 1
    return label


def test_command_line_scores_every_2024_region_with_the_2024_rules(tmp_path):
    # Case 1 is perfect; case 2 swaps cyst and non-enhancing tumour, so NETC and CC score 0, the rest 1.
    cases = {
        "BraTS-PED-00021-000": (tumour_2024(), tumour_2024()),
        "BraTS-PED-00022-000": (tumour_2024(True), tumour_2024()),
    }
    pred_dir, gt_dir = brats_layout(tmp_path, cases)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "scripts.evaluate", "--pred_dir", str(pred_dir), "--gt_dir", str(gt_dir)]
    result = subprocess.run(
        [*command, "--output_dir", str(out), "--challenge", "PED2024"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr

    assert sorted(p.name for p in out.iterdir()) == EVALUATION_FILES
    report = (out / "report.md").read_text()
    assert "| CC | lesion-wise Dice | 0.5000 ± 0.5000 | 0.5000 |" in report
    assert "Sorted by the mean lesion-wise Dice over ET, TC, WT, NETC, CC, ED" in report
    header, rows = read_csv(out / "metrics_per_case.csv")
    assert header == PER_CASE_HEADER
    assert [(row["case"], row["region"]) for row in rows] == [
        (case, region) for case in cases for region in REGIONS_2024
    ]
    assert [float(row["gt_volume"]) for row in rows[:6]] == [72.0, 384.0, 1440.0, 168.0, 144.0, 1056.0]
    assert [float(row["legacy_dice"]) for row in rows] == [1.0] * 6 + [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert [float(row["lesionwise_dice"]) for row in rows[6:]] == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["challenge"], summary["label_scheme"], summary["num_cases"]) == ("PED2024", "brats2024_ped", 2)
    assert list(summary["regions"]) == list(REGIONS_2024)
    assert summary["regions"]["CC"]["legacy_dice"]["mean"] == 0.5
    summary_header, summary_rows = read_csv(out / "summary.csv")
    assert summary_header == "region,metric,mean,std,median,p25,p75"
    assert [(row["region"], row["metric"]) for row in summary_rows] == [
        (region, metric) for region in REGIONS_2024 for metric in METRIC_NAMES
    ]

    lines = result.stdout.splitlines()
    assert lines[0] == "2 case(s), labels brats2024_ped (BraTS-PEDs 2024 and later)"
    assert lines[1].startswith("official PED2024 rules: GT lesions merged and matched by 5 dilation(s)")
    assert [line.split() for line in lines[-6:]] == [
        [region, f"{dice:.4f}", f"{dice:.4f}"]
        for region, dice in zip(REGIONS_2024, (1, 1, 1, 0.5, 0.5, 1), strict=True)
    ]


@pytest.mark.parametrize("entry", ["folders", "cases"])
def test_a_label_scheme_brings_its_rules(tmp_path, entry):
    pred_dir, gt_dir = brats_layout(tmp_path, {"BraTS-PED-00023-000": (tumour_2024(True), tumour_2024())})
    if entry == "folders":
        summary = evaluate_folders(str(pred_dir), str(gt_dir), str(tmp_path / "out"), label_scheme="brats2024_ped")
    else:
        case = "BraTS-PED-00023-000"
        pairs = [(case, str(pred_dir / f"{case}.nii.gz"), str(gt_dir / case / f"{case}-seg.nii.gz"))]
        summary = evaluate_cases(pairs, str(tmp_path / "out"), challenge=None, label_scheme="brats2024_ped")
    assert (summary["challenge"], summary["label_scheme"]) == ("PED2024", "brats2024_ped")
    assert {region: metrics["legacy_dice"]["mean"] for region, metrics in summary["regions"].items()} == {
        "ET": 1.0,
        "TC": 1.0,
        "WT": 1.0,
        "NETC": 0.0,
        "CC": 0.0,
        "ED": 1.0,
    }
    # Both named: both kept (here the 2023 PED rules on the 2024 regions).
    both = evaluate_folders(str(pred_dir), str(gt_dir), str(tmp_path / "out2"), "PED", "brats2024_ped")
    assert (both["challenge"], both["label_scheme"], list(both["regions"])) == (
        "PED",
        "brats2024_ped",
        list(REGIONS_2024),
    )


def test_2024_labels_are_refused_under_the_2023_scheme_naming_the_scheme_they_fit(tmp_path):
    case = "BraTS-PED-00024-000"
    pred_dir, gt_dir = brats_layout(tmp_path, {case: (tumour_2024(), tumour_2024())})
    with pytest.raises(EvaluationInputError) as caught:
        evaluate_folders(str(pred_dir), str(gt_dir), str(tmp_path / "out"), challenge="PED")
    outside = (
        "label values [4] outside [0, 1, 2, 3] (brats2023_ped: BraTS 2023 (pediatric and adult)); "
        "they fit --label_scheme brats2024_ped"
    )
    assert caught.value.problems == [
        f"{case}: prediction {pred_dir / f'{case}.nii.gz'}: {outside}",
        f"{case}: ground truth {gt_dir / case / f'{case}-seg.nii.gz'}: {outside}",
    ]
    assert not (tmp_path / "out").exists()


def test_values_outside_the_2024_labels_are_refused_under_the_2024_scheme(tmp_path):
    case = "BraTS-PED-00025-000"
    pred = tumour_2024()
    pred[0, 0, 0] = 5
    pred_dir, gt_dir = brats_layout(tmp_path, {case: (pred, tumour_2024())})
    with pytest.raises(EvaluationInputError) as caught:
        evaluate_folders(str(pred_dir), str(gt_dir), str(tmp_path / "out"), challenge="PED2024")
    assert caught.value.problems == [
        f"{case}: prediction {pred_dir / f'{case}.nii.gz'}: "
        "label values [5] outside [0, 1, 2, 3, 4] (brats2024_ped: BraTS-PEDs 2024 and later)"
    ]
