"""The evaluation report (report.md, box plots, the worst cases drawn) and the cross-validation summary of folds."""

from __future__ import annotations

import csv
import json
import re
import statistics
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from scripts.cases import MODALITIES
from scripts.errors import InputError
from scripts.evaluate import EvaluationInputError, evaluate_cases, evaluate_folders, main
from scripts.metrics import METRIC_NAMES
from scripts.report import HEADLINE_METRICS, write_report
from scripts.summarize_folds import main as summarize_main
from scripts.summarize_folds import summarize_folds
from scripts.synthetic import write_case
from tests.test_evaluate import AFFINE, EVALUATION_FILES, SHAPE, brats_layout, tumour, tumour_2024

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PERFECT, SHIFTED, EXTRA_LESION, MISSED = (f"BraTS-PED-0010{n}-000" for n in range(4))


def shifted() -> np.ndarray:
    """The tumour one voxel off in x: overlapping, not equal."""
    return np.roll(tumour(), 1, axis=0)


def with_extra_lesion() -> np.ndarray:
    """The tumour plus a false-positive 27-voxel core lesion far from it."""
    label = tumour()
    label[12:15, 12:15, 8:11] = 1
    return label


CASES = {
    PERFECT: (tumour(), tumour()),
    SHIFTED: (shifted(), tumour()),
    EXTRA_LESION: (with_extra_lesion(), tumour()),
    MISSED: (np.zeros(SHAPE, np.uint8), tumour()),
}


def add_images(gt_dir: Path, cases) -> Path:
    """The four modalities of each case beside its ground truth, so that gt_dir is a dataset folder."""
    rng = np.random.default_rng(0)
    for case in cases:
        images = {modality: (rng.random(SHAPE) + 1.0).astype(np.float32) for modality in MODALITIES}
        write_case(gt_dir / case, case, images, tumour(), AFFINE)
    return gt_dir


def section(report: str, title: str) -> str:
    """The text of one "## title" section of the report."""
    return report.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0].strip()


def table(text: str) -> list[list[str]]:
    """The body rows of the first Markdown table in `text`, as cells."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def worst_first(rows: list[dict]) -> list[str]:
    """Cases by mean lesion-wise Dice over their regions, lowest first, computed straight from the per-case CSV."""
    by_case: dict[str, list[float]] = {}
    for row in rows:
        by_case.setdefault(row["case"], []).append(float(row["lesionwise_dice"]))
    return sorted(by_case, key=lambda case: (statistics.fmean(by_case[case]), case))


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    picture = matplotlib.image.imread(path)
    assert picture.ndim == 3 and min(picture.shape[:2]) > 100


def test_report_lists_every_case_worst_first_with_the_summary_numbers(tmp_path):
    pred_dir, gt_dir = brats_layout(tmp_path, CASES)
    out = tmp_path / "out"
    evaluate_folders(str(pred_dir), str(gt_dir), str(out))

    assert sorted(p.name for p in out.iterdir()) == EVALUATION_FILES
    report = (out / "report.md").read_text()
    expected_order = worst_first(read_rows(out / "metrics_per_case.csv"))
    assert expected_order[0] == MISSED and expected_order[-1] == PERFECT
    assert len(set(expected_order)) == len(CASES)
    every_case = section(report, "Every case, worst first")
    assert "Sorted by the mean lesion-wise Dice over ET, TC, WT, lowest first" in every_case
    listed = table(every_case)
    assert [row[1] for row in listed] == expected_order
    assert [row[0] for row in listed] == ["1", "2", "3", "4"]
    assert listed[-1][2] == "1.0000"

    summary = json.loads((out / "summary.json").read_text())
    expected_summary = [
        [
            region,
            title,
            f"{values['mean']:{spec}} ± {values['std']:{spec}}",
            f"{values['median']:{spec}}",
        ]
        for region in ("ET", "TC", "WT")
        for metric, title in HEADLINE_METRICS.items()
        for values, spec in [(summary["regions"][region][metric], ".2f" if "hd95" in metric else ".4f")]
    ]
    assert table(section(report, "Summary")) == expected_summary
    assert "4 case(s), labels brats2023_ped (BraTS 2023 (pediatric and adult)); official PED rules: " in report
    assert "![Box plots of lesion-wise and legacy Dice and HD95 per region](boxplots.png)" in report
    assert_png(out / "boxplots.png")
    assert "Overlays not drawn: the case images are not known" in section(report, "The 3 worst cases")


def test_the_three_worst_cases_are_drawn_when_the_images_are_known(tmp_path, capsys):
    pred_dir, gt_dir = brats_layout(tmp_path, CASES)
    images_dir = add_images(gt_dir, CASES)
    out = tmp_path / "out"
    (out / "overlays").mkdir(parents=True)
    (out / "overlays" / "BraTS-PED-09999-000.png").write_bytes(PNG_SIGNATURE)  # an earlier run's worst case

    main(pred_dir=str(pred_dir), gt_dir=str(gt_dir), output_dir=str(out), images_dir=str(images_dir))

    worst_three = worst_first(read_rows(out / "metrics_per_case.csv"))[:3]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == sorted(f"{case}.png" for case in worst_three)
    for case in worst_three:
        assert_png(out / "overlays" / f"{case}.png")
    drawn = section((out / "report.md").read_text(), "The 3 worst cases")
    assert re.findall(r"!\[(.+?)\]\(overlays/(.+?)\.png\)", drawn) == [(case, case) for case in worst_three]
    assert "not drawn" not in drawn


def test_a_case_the_images_folder_lacks_is_refused_before_anything_is_written(tmp_path):
    pred_dir, gt_dir = brats_layout(tmp_path, CASES)
    images_dir = add_images(tmp_path / "images", [PERFECT, SHIFTED, EXTRA_LESION])
    with pytest.raises(EvaluationInputError) as caught:
        evaluate_folders(str(pred_dir), str(gt_dir), str(tmp_path / "out"), images_dir=str(images_dir))
    assert caught.value.problems == [
        f"{MISSED}: no case folder in images folder {images_dir} "
        "(BraTS layout: <case>/<case>-t1c.nii.gz, directly or one folder down)"
    ]
    with pytest.raises(EvaluationInputError, match=f"images folder {tmp_path / 'nowhere'} does not exist"):
        evaluate_folders(str(pred_dir), str(gt_dir), str(tmp_path / "out"), images_dir=str(tmp_path / "nowhere"))
    pairs = [(PERFECT, str(pred_dir / f"{PERFECT}.nii.gz"), str(gt_dir / PERFECT / f"{PERFECT}-seg.nii.gz"))]
    with pytest.raises(EvaluationInputError, match=f"{PERFECT}: case folder {tmp_path / 'nowhere'} does not exist"):
        evaluate_cases(pairs, str(tmp_path / "out"), case_dirs={PERFECT: str(tmp_path / "nowhere")})
    assert not (tmp_path / "out").exists()


def test_evaluate_cases_draws_from_the_case_folders_and_says_why_one_could_not_be_drawn(tmp_path):
    pred_dir, gt_dir = brats_layout(tmp_path, {PERFECT: CASES[PERFECT], MISSED: CASES[MISSED]})
    add_images(gt_dir, [PERFECT, MISSED])
    (gt_dir / MISSED / f"{MISSED}-t2w.nii.gz").unlink()
    pairs = [
        (case, str(pred_dir / f"{case}.nii.gz"), str(gt_dir / case / f"{case}-seg.nii.gz"))
        for case in (PERFECT, MISSED)
    ]
    out = tmp_path / "out"

    evaluate_cases(pairs, str(out), case_dirs={case: str(gt_dir / case) for case, _, _ in pairs})

    assert [p.name for p in (out / "overlays").iterdir()] == [f"{PERFECT}.png"]
    drawn = section((out / "report.md").read_text(), "The 2 worst cases")
    assert drawn.startswith(f"1. {MISSED}: mean lesion-wise Dice 0.3333; overlay not drawn: {MISSED}: ")
    assert "t2w" in drawn.splitlines()[0]
    assert f"2. {PERFECT}: mean lesion-wise Dice 1.0000\n\n![{PERFECT}](overlays/{PERFECT}.png)" in drawn


def test_write_report_alone_lists_2024_regions(tmp_path):
    rows = [
        {"case": case, "region": region, **{metric: 0.0 for metric in METRIC_NAMES}, "lesionwise_dice": dice}
        for case, dice in (("b", 0.5), ("a", 0.5), ("c", 0.25))
        for region in ("ET", "TC", "WT", "NETC", "CC", "ED")
    ]
    stats = {"mean": 0.0, "std": 0.0, "median": 0.0, "p25": 0.0, "p75": 0.0}
    summary = {
        "challenge": "PED2024",
        "label_scheme": "brats2024_ped",
        "num_cases": 3,
        "regions": {r: {m: stats for m in METRIC_NAMES} for r in ("ET", "TC", "WT", "NETC", "CC", "ED")},
    }
    path = write_report(tmp_path, rows, summary, predictions={})
    every_case = section(path.read_text(), "Every case, worst first")
    assert [row[1] for row in table(every_case)] == ["c", "a", "b"]  # equal scores in case order
    assert "over ET, TC, WT, NETC, CC, ED" in every_case
    assert len(table(section(path.read_text(), "Summary"))) == 6 * len(HEADLINE_METRICS)


# ---- the cross-validation summary ----


def evaluate_fold(fold_dir: Path, cases: dict, label_scheme: str = "brats2023_ped") -> Path:
    """Evaluate `cases` as the fold's validation cases, as configs/evaluate.yaml would into fold_dir/evaluation."""
    pred_dir, gt_dir = brats_layout(fold_dir / "data", cases)
    evaluate_folders(str(pred_dir), str(gt_dir), str(fold_dir / "evaluation"), label_scheme=label_scheme)
    return fold_dir / "evaluation" / "metrics_per_case.csv"


@pytest.mark.parametrize("layout", ["models/{fold}", "models/demo/brats2023_ped/{fold}"])
def test_fold_summary_equals_the_statistics_of_the_per_case_files(tmp_path, layout):
    folds = {
        "fold0": {PERFECT: CASES[PERFECT], MISSED: CASES[MISSED]},
        "fold1": {SHIFTED: CASES[SHIFTED]},
        "fold10": {EXTRA_LESION: CASES[EXTRA_LESION], "BraTS-PED-00104-000": CASES[SHIFTED]},
    }
    files = {fold: evaluate_fold(tmp_path / layout.format(fold=fold), cases) for fold, cases in folds.items()}

    cv_summary = summarize_folds(tmp_path / "models")

    rows = {fold: read_rows(path) for fold, path in files.items()}
    written = read_rows(tmp_path / "models" / "cv_summary.csv")
    assert list(written[0]) == ["region", "metric", "mean", "std", "median", "p25", "p75"] + [
        f"{fold}_mean" for fold in ("fold0", "fold1", "fold10")
    ]
    assert [(row["region"], row["metric"]) for row in written] == [
        (region, metric) for region in ("ET", "TC", "WT") for metric in METRIC_NAMES
    ]
    for row in written:

        def values(fold_rows, row=row):
            return [float(r[row["metric"]]) for r in fold_rows if r["region"] == row["region"]]

        every_case = [value for fold_rows in rows.values() for value in values(fold_rows)]
        assert len(every_case) == 5
        assert float(row["mean"]) == pytest.approx(statistics.fmean(every_case))
        assert float(row["std"]) == pytest.approx(statistics.pstdev(every_case))
        assert float(row["median"]) == pytest.approx(statistics.median(every_case))
        for fold, fold_rows in rows.items():
            assert float(row[f"{fold}_mean"]) == pytest.approx(statistics.fmean(values(fold_rows)))
    assert cv_summary["folds"] == {"fold0": 2, "fold1": 1, "fold10": 2}

    markdown = (tmp_path / "models" / "cv_summary.md").read_text()
    assert "3 fold(s), 5 case(s) (fold0: 2, fold1: 1, fold10: 2); labels brats2023_ped" in markdown
    tc_dice = next(row for row in table(markdown) if row[:2] == ["TC", "lesion-wise Dice"])
    tc = cv_summary["regions"]["TC"]["lesionwise_dice"]
    assert tc_dice[2:] == [
        f"{tc['mean']:.4f} ± {tc['std']:.4f}",
        f"{tc['median']:.4f}",
        *(f"{tc['fold_means'][fold]:.4f}" for fold in ("fold0", "fold1", "fold10")),
    ]
    assert "![Mean lesion-wise Dice per fold and region](cv_summary.png)" in markdown
    assert_png(tmp_path / "models" / "cv_summary.png")


def test_folds_scored_with_different_label_schemes_are_refused_naming_the_files(tmp_path, capsys):
    first = evaluate_fold(tmp_path / "models" / "fold0", {PERFECT: CASES[PERFECT]})
    second = evaluate_fold(
        tmp_path / "models" / "fold1", {"BraTS-PED-00105-000": (tumour_2024(), tumour_2024())}, "brats2024_ped"
    )
    capsys.readouterr()  # the evaluations' progress bars
    with pytest.raises(SystemExit) as exited:
        summarize_main(models_dir=str(tmp_path / "models"))
    assert exited.value.code == 1
    errors = capsys.readouterr().err.splitlines()
    assert errors == [
        "error: the folds were scored differently; evaluate them all with one label scheme and rules:",
        f"error: {first}: labels brats2023_ped, PED rules, regions ET, TC, WT",
        f"error: {second}: labels brats2024_ped, PED2024 rules, regions ET, TC, WT, NETC, CC, ED",
    ]
    assert not (tmp_path / "models" / "cv_summary.csv").exists()


def test_no_evaluated_fold_is_an_error_naming_the_folder_searched(tmp_path, capsys):
    models = tmp_path / "models"
    (models / "fold0").mkdir(parents=True)  # trained, never evaluated
    with pytest.raises(SystemExit) as exited:
        summarize_main(models_dir=str(models))
    assert exited.value.code == 1
    (error,) = capsys.readouterr().err.splitlines()
    assert error.startswith(f"error: no evaluated fold in {models}: looked for {models}/fold*/evaluation/")
    with pytest.raises(InputError, match=f"models folder not found: {tmp_path / 'nowhere'}"):
        summarize_folds(tmp_path / "nowhere")


def test_folds_of_several_runs_are_refused_rather_than_mixed(tmp_path):
    evaluate_fold(tmp_path / "models" / "fold0", {PERFECT: CASES[PERFECT]})
    evaluate_fold(tmp_path / "models" / "demo" / "brats2023_ped" / "fold0", {SHIFTED: CASES[SHIFTED]})
    with pytest.raises(InputError) as caught:
        summarize_folds(tmp_path / "models")
    assert caught.value.problems == [
        f"evaluated folds in 2 folders under {tmp_path / 'models'}; pass one as --models_dir:",
        f"{tmp_path / 'models'}: fold0",
        f"{tmp_path / 'models' / 'demo' / 'brats2023_ped'}: fold0",
    ]
    # Either run alone is summed up, into the folder named.
    summarize_folds(tmp_path / "models" / "demo" / "brats2023_ped", output_dir=tmp_path / "cv")
    assert sorted(p.name for p in (tmp_path / "cv").iterdir()) == ["cv_summary.csv", "cv_summary.md", "cv_summary.png"]


def test_a_case_in_two_folds_is_refused(tmp_path):
    evaluate_fold(tmp_path / "models" / "fold0", {PERFECT: CASES[PERFECT]})
    evaluate_fold(tmp_path / "models" / "fold1", {PERFECT: CASES[PERFECT]})
    with pytest.raises(InputError, match=f"{PERFECT}: evaluated in both fold0 and fold1"):
        summarize_folds(tmp_path / "models")
