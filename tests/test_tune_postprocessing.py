"""Post-processing chosen on cross-validation (scripts/tune_postprocessing.py) and read by configs/inference.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser
from scipy import ndimage

from scripts.errors import InputError, problem_lines
from scripts.evaluate import evaluate_cases
from scripts.inference import write_label_like, write_probabilities
from scripts.labels import get_scheme
from scripts.postprocess import (
    RemoveSmallComponentsd,
    SmallEnhancingToNecrosisd,
    read_postprocessing_file,
    without_small_components,
)
from scripts.prepare_datalist import fold_split
from scripts.tune_postprocessing import crop_case, postprocessed_label, tune, tune_postprocessing
from tests.conftest import INFERENCE_CONFIG, REPOSITORY, TRAIN_CONFIG
from tests.test_inference import config_labels

SCHEME = get_scheme("brats2023_ped")
SHAPE = (40, 40, 40)
SPECK = 27  # voxels of the false components: 3 x 3 x 3
LARGE = 100  # voxels of the smallest real component predicted on the synthetic cases


def ball(centre: tuple[int, int, int], radius: float, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    grid = np.indices(shape, sparse=True)
    return sum((axis - c) ** 2 for axis, c in zip(grid, centre, strict=True)) <= radius**2


def label_map(whole: np.ndarray, core: np.ndarray, enhancing: np.ndarray | None = None) -> np.ndarray:
    """2023 labels: edema in `whole`, necrosis in `core`, enhancing tumour in `enhancing`."""
    label = np.where(whole, 2, 0).astype(np.uint8)
    label[core] = 1
    if enhancing is not None:
        label[enhancing] = 3
    return label


def tumour(enhancing_radius: float = 3, whole_radius: float = 8) -> np.ndarray:
    centre = (20, 20, 20)
    return label_map(ball(centre, whole_radius), ball(centre, 5), ball(centre, enhancing_radius))


def case(name: str, prediction: np.ndarray, ground_truth: np.ndarray):
    """A tuning case from predicted network regions and a ground-truth label map (1 mm voxels)."""
    return crop_case(name, "probabilities", prediction, ground_truth, (1.0, 1.0, 1.0), margin=4)


def with_speck(regions: np.ndarray, corner: tuple[int, int, int] = (2, 2, 2)) -> np.ndarray:
    """`regions` plus a 3 x 3 x 3 component far from the tumour in every region."""
    regions = regions.copy()
    regions[(slice(None), *(slice(c, c + 3) for c in corner))] = True
    return regions


def test_removes_small_false_components_in_every_region():
    """A false 27-voxel component in TC, WT and ET of every case: each region removes it (the smallest grid size
    above 27) and its lesion-wise Dice goes from 1/2 (one hit, one false positive) to 1; the ET rule has nothing
    left to gain."""
    cases = [
        case(f"case{i}", with_speck(SCHEME.labels_to_regions(tumour(3 + i % 2))), tumour(3 + i % 2)) for i in range(3)
    ]
    result = tune(cases, SCHEME, "PED")
    assert result["min_component_voxels"] == [50, 50, 50]
    assert result["min_et_fraction"] == 0.0
    for region in SCHEME.scored_regions:
        assert result["before"][region]["lesionwise_dice"] == pytest.approx(0.5)
        assert result["after"][region]["lesionwise_dice"] == pytest.approx(1.0)
        assert result["before"][region]["num_fp"] == 1 and result["after"][region]["num_fp"] == 0
    # The legacy Dice counts the 27 voxels too; every candidate was recorded.
    assert result["before"]["ET"]["legacy_dice"] < result["after"]["ET"]["legacy_dice"] == pytest.approx(1.0)
    assert result["trials"]["min_component_voxels"]["ET"]["25"]["ET"] == pytest.approx(0.5)
    assert result["trials"]["min_component_voxels"]["ET"]["50"]["ET"] == pytest.approx(1.0)


def test_relabels_enhancing_specks_that_component_removal_cannot_take():
    """One case predicts an ET speck of 150 voxels (3.6 % of its whole tumour) where there is none, another has a real
    ET of 123 voxels: removing components of 200 voxels trades one for the other, whereas the ET rule at 0.04 (the
    smallest fraction above 3.6 %) fixes the first and leaves the second (24 % of its tumour) alone."""
    centre = (20, 20, 20)
    without_et = label_map(ball(centre, 10), ball(centre, 6))
    speck = np.zeros(SHAPE, dtype=bool)
    speck[18:23, 18:23, 17:23] = True
    predicted = SCHEME.labels_to_regions(label_map(ball(centre, 10), ball(centre, 6), speck))
    assert 0.03 < speck.sum() / (without_et > 0).sum() < 0.04
    small_tumour = label_map(ball(centre, 5), ball(centre, 4), ball(centre, 3))
    cases = [case("speck", predicted, without_et), case("real", SCHEME.labels_to_regions(small_tumour), small_tumour)]
    result = tune(cases, SCHEME, "PED")
    assert result["min_et_fraction"] == 0.04
    assert result["min_component_voxels"] == [0, 0, 0]
    assert result["before"]["ET"]["lesionwise_dice"] == pytest.approx(0.5)
    assert result["after"]["ET"]["lesionwise_dice"] == pytest.approx(1.0)
    assert result["after"]["TC"] == result["before"]["TC"]  # relabelled ET stays tumour core
    assert result["trials"]["min_component_voxels"]["ET"]["200"]["ET"] == pytest.approx(0.5)  # a trade, not a gain


def test_worker_processes_give_the_in_process_result():
    """Three cases over two worker processes (one holds two): the same values, scores and candidates' scores."""
    cases = [case("speck", with_speck(SCHEME.labels_to_regions(tumour())), tumour())]
    cases += [case(f"c{i}", SCHEME.labels_to_regions(tumour(2 + i)), tumour(3)) for i in range(2)]
    in_process = tune(cases, SCHEME, "PED")
    assert tune(cases, SCHEME, "PED", num_workers=2) == in_process
    assert in_process["min_component_voxels"] == [50, 50, 50] and in_process["sources"]["probabilities"] == 3
    assert in_process["before"]["ET"]["lesionwise_dice"] < in_process["after"]["ET"]["lesionwise_dice"]


def test_keeps_no_post_processing_when_nothing_is_gained():
    """Perfect predictions, one with a small real ET lesion that every larger size would remove."""
    labels = [tumour(), tumour(enhancing_radius=2)]
    result = tune(
        [case(f"case{i}", SCHEME.labels_to_regions(label), label) for i, label in enumerate(labels)], SCHEME, "PED"
    )
    assert result["min_component_voxels"] == [0, 0, 0] and result["min_et_fraction"] == 0.0
    assert result["after"] == result["before"]


def test_keeps_a_value_that_helps_its_region_but_lowers_the_others():
    """A small core lesion predicted as ET only (painted as ET, so TC and WT find it): removing ET components under 75
    voxels would clear the false ET but lose the lesion in TC and WT, lowering the mean over the regions."""
    lesion = np.zeros(SHAPE, dtype=bool)
    lesion[30:34, 30:34, 30:34] = True  # 64 voxels
    ground_truth = tumour()
    ground_truth[lesion] = 1
    prediction = SCHEME.labels_to_regions(tumour())
    prediction[SCHEME.channel_index("ET")][lesion] = True
    result = tune([case("c", prediction, ground_truth)], SCHEME, "PED")
    assert result["min_component_voxels"] == [0, 0, 0] and result["after"] == result["before"]
    assert result["trials"]["min_component_voxels"]["ET"]["75"] == {"ET": 1.0, "all regions": pytest.approx(2 / 3)}
    assert result["before"]["ET"]["lesionwise_dice"] == 0.5


@pytest.mark.parametrize(("sizes", "fraction"), [([0, 0, 0], 0.0), ([9, 0, 30], 0.0), ([0, 20, 0], 0.05)])
def test_tuned_label_maps_are_what_inference_config_makes(sizes, fraction):
    """The tuner scores exactly the label maps that configs/inference.yaml's post-processing makes of the same
    probabilities with the chosen values."""
    rng = np.random.default_rng(len(sizes) + sum(sizes))
    smooth = ndimage.gaussian_filter(rng.random((3, 24, 24, 24)), sigma=(0, 1.5, 1.5, 1.5))
    probabilities = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    probabilities[1] = np.maximum(probabilities[1], probabilities[0])  # nested, so WT is the larger region
    ground_truth = np.zeros(probabilities.shape[1:], dtype=np.uint8)
    tuned = postprocessed_label(case("c", probabilities >= 0.5, ground_truth), sizes, fraction, SCHEME)
    expected = config_labels(probabilities, min_component_voxels=sizes, min_et_fraction=fraction)
    np.testing.assert_array_equal(tuned, expected[tuple(slice(0, n) for n in tuned.shape)])
    assert tuned.shape == expected.shape  # the crop holds all of it here


# From evaluation folders to the file inference.yaml reads.


def speck_corner(label: np.ndarray) -> tuple[int, int, int]:
    """A corner of a 3 x 3 x 3 cube as far from the tumour as the volume allows."""
    distance = ndimage.distance_transform_edt(label == 0)
    for axis in range(label.ndim):  # the cube must fit
        distance[(slice(None),) * axis + (slice(-2, None),)] = 0
    return tuple(int(i) for i in np.unravel_index(np.argmax(distance), label.shape))


@pytest.fixture()
def evaluated_fold(synthetic_dataset: Path, synthetic_datalist: Path, tmp_path: Path) -> Path:
    """models/fold0/evaluation as configs/evaluate.yaml writes it with --probabilities_dir .../probabilities, for
    predictions that are the ground truth's components of over 100 voxels (so that removing smaller ones costs
    nothing) plus a false 27-voxel component in every region."""
    evaluation = tmp_path / "models" / "fold0" / "evaluation"
    _, validation = fold_split(synthetic_datalist, synthetic_dataset, 0)
    pairs = []
    for entry in validation:
        label = np.asanyarray(nib.load(entry["label"]).dataobj).astype(np.uint8)
        large = [without_small_components(region, LARGE) for region in SCHEME.labels_to_regions(label)]
        regions = with_speck(np.stack(large), speck_corner(label))
        prediction = evaluation / "predictions" / f"{entry['case']}.nii.gz"
        write_label_like(SCHEME.regions_to_labels(regions)[0], entry["label"], prediction)
        probabilities = np.where(regions, 0.9, 0.1)
        write_probabilities(
            probabilities, SCHEME.channels, entry["label"], evaluation / "probabilities" / f"{entry['case']}.npz"
        )
        pairs.append((entry["case"], str(prediction), entry["label"]))
    evaluate_cases(pairs, str(evaluation), label_scheme=SCHEME.name)
    return evaluation


def tuned(synthetic_dataset: Path, synthetic_datalist: Path, evaluated_fold: Path, num_workers: int = 0) -> dict:
    models = evaluated_fold.parents[1]
    return tune_postprocessing(
        str(synthetic_dataset),
        str(synthetic_datalist),
        [models],
        models / "postprocessing.json",
        num_workers=num_workers,
    )


def test_tunes_on_an_evaluated_fold_and_inference_reads_the_choice(
    synthetic_dataset, synthetic_datalist, evaluated_fold
):
    record = tuned(synthetic_dataset, synthetic_datalist, evaluated_fold)
    models = evaluated_fold.parents[1]
    assert json.loads((models / "postprocessing.json").read_text()) == json.loads(json.dumps(record))
    assert record["label_scheme"] == "brats2023_ped" and record["challenge"] == "PED"
    assert record["sources"] == {"probabilities": 2, "label map": 0}
    assert all(SPECK < size <= LARGE for size in record["min_component_voxels"])
    assert record["enhancing_rule"] == {"region": "ET", "from_label": 3, "to_label": 1}
    for region in SCHEME.scored_regions:
        assert record["scores"]["after"][region]["num_fp"] == 0 < record["scores"]["before"][region]["num_fp"]
        assert (
            record["scores"]["after"][region]["lesionwise_dice"] > record["scores"]["before"][region]["lesionwise_dice"]
        )

    # inference.yaml (as MONAI Label loads it too) takes the values from the file; an explicit value still wins.
    parser = ConfigParser()
    parser.read_config(INFERENCE_CONFIG)
    parser["bundle_root"] = str(models.parent)
    transforms = parser.get_parsed_content("postprocessing").transforms
    remove = next(t for t in transforms if isinstance(t, RemoveSmallComponentsd))
    relabel = next(t for t in transforms if isinstance(t, SmallEnhancingToNecrosisd))
    assert remove.min_voxels == record["min_component_voxels"] and relabel.min_fraction == record["min_et_fraction"]
    parser["min_component_voxels"] = 7
    assert parser.get_parsed_content("min_component_voxels") == 7
    # evaluate.yaml still measures the raw network: it sets the two values itself.
    evaluation = ConfigParser()
    evaluation.read_config([TRAIN_CONFIG, str(REPOSITORY / "configs" / "evaluate.yaml")])
    evaluation["bundle_root"] = str(models.parent)
    transforms = evaluation.get_parsed_content("postprocessing").transforms
    assert next(t for t in transforms if isinstance(t, RemoveSmallComponentsd)).min_voxels == [0, 0, 0]


def test_falls_back_to_label_maps_without_probabilities(synthetic_dataset, synthetic_datalist, evaluated_fold):
    first = sorted((evaluated_fold / "probabilities").iterdir())[0]
    first.unlink()
    record = tuned(synthetic_dataset, synthetic_datalist, evaluated_fold)
    assert record["sources"] == {"probabilities": 1, "label map": 1}
    assert all(SPECK < size <= LARGE for size in record["min_component_voxels"])
    # Two worker processes, each loading one case from its own source: the same record.
    assert tuned(synthetic_dataset, synthetic_datalist, evaluated_fold, num_workers=2) == record


def test_refuses_label_maps_that_evaluation_post_processed(synthetic_dataset, synthetic_datalist, evaluated_fold):
    """evaluate.yaml records its post-processing in inference.json: tuning on label maps it changed would start from
    post-processed scores. Probabilities are the network's own whatever it records."""

    def evaluated_with(settings: dict) -> None:
        (evaluated_fold / "inference.json").write_text(json.dumps({"written": 2, "settings": settings}))

    evaluated_with({"min_component_voxels": [0, 0, 0], "min_et_fraction": 0.04})
    assert tuned(synthetic_dataset, synthetic_datalist, evaluated_fold)["sources"]["label map"] == 0
    sorted((evaluated_fold / "probabilities").iterdir())[0].unlink()
    with pytest.raises(InputError) as raised:
        tuned(synthetic_dataset, synthetic_datalist, evaluated_fold)
    assert raised.value.problems == [
        f"{evaluated_fold}: its label maps were post-processed (min_et_fraction 0.04) and it saved no probabilities "
        f"to tune on: evaluate the fold again with --probabilities_dir {evaluated_fold / 'probabilities'}"
    ]
    evaluated_with({"min_component_voxels": [0, 0, 0], "min_et_fraction": 0.0})
    assert tuned(synthetic_dataset, synthetic_datalist, evaluated_fold)["sources"]["label map"] == 1


def test_refuses_cases_of_another_fold_and_unreadable_probabilities(
    synthetic_dataset, synthetic_datalist, evaluated_fold
):
    models = evaluated_fold.parents[1]
    (models / "fold0").rename(models / "fold1")
    with pytest.raises(InputError) as raised:
        tuned(synthetic_dataset, synthetic_datalist, models / "fold1" / "evaluation")
    assert all("not a validation case of fold1" in line for line in raised.value.problems)
    (models / "fold1").rename(models / "fold0")
    broken = sorted((evaluated_fold / "probabilities").iterdir())[0]
    broken.write_bytes(b"not a zip file")
    with pytest.raises(InputError, match=f"cannot read probabilities {broken}"):
        tuned(synthetic_dataset, synthetic_datalist, evaluated_fold, num_workers=2)
    assert not (models / "postprocessing.json").exists()


def test_inference_refuses_a_file_tuned_for_another_label_scheme(tmp_path):
    path = tmp_path / "models" / "postprocessing.json"
    path.parent.mkdir()
    path.write_text(
        json.dumps({"label_scheme": "brats2024_ped", "min_component_voxels": [0] * 4, "min_et_fraction": 0})
    )
    parser = ConfigParser()
    parser.read_config(INFERENCE_CONFIG)
    parser["bundle_root"] = str(tmp_path)
    with pytest.raises(Exception) as raised:  # MONAI wraps what an expression raises
        parser.get_parsed_content("min_et_fraction")
    assert problem_lines(raised.value) == [
        f"post-processing file {path} was tuned for label scheme brats2024_ped, but label_scheme is brats2023_ped: "
        "tune it on evaluations of brats2023_ped (python -m scripts.tune_postprocessing), or pass "
        "--postprocessing_file null"
    ]


def test_inference_config_takes_both_values_from_the_file(tmp_path):
    path = tmp_path / "tuned.json"
    path.write_text(
        json.dumps({"label_scheme": "brats2023_ped", "min_component_voxels": [5, 6, 7], "min_et_fraction": 0.03})
    )
    parser = ConfigParser()
    parser.read_config(INFERENCE_CONFIG)
    parser["postprocessing_file"] = str(path)
    assert parser.get_parsed_content("min_component_voxels") == [5, 6, 7]
    assert parser.get_parsed_content("min_et_fraction") == 0.03
    parser["postprocessing_file"] = None
    assert parser.get_parsed_content("min_component_voxels") == 0


def test_post_processing_file_values_are_checked(tmp_path):
    path = tmp_path / "postprocessing.json"
    assert read_postprocessing_file(path) == {"min_component_voxels": 0, "min_et_fraction": 0.0}  # no file: none
    assert read_postprocessing_file(None) == {"min_component_voxels": 0, "min_et_fraction": 0.0}
    path.write_text(json.dumps({"label_scheme": "brats2023_ped", "min_component_voxels": [1, 2], "min_et_fraction": 2}))
    with pytest.raises(InputError) as raised:
        read_postprocessing_file(path)
    assert len(raised.value.problems) == 2 and all(str(path) in line for line in raised.value.problems)
    path.write_text("{")
    with pytest.raises(InputError, match=f"post-processing file {path}: cannot read it as JSON"):
        read_postprocessing_file(path)
