"""Case pictures: labels drawn where they are, in their colours, for any orientation, spacing or missing label."""

from __future__ import annotations

import re
from pathlib import Path

import fire
import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from scripts.errors import InputError
from scripts.labels import SCHEMES
from scripts.synthetic import BRATS_SHAPE, make_case, write_case
from scripts.visualize import (
    LABEL_COLOURS,
    LABEL_OPACITY,
    case_figure,
    figure_rgb,
    main,
    render_case,
    tumour_centre,
)
from tests.conftest import SMALL_SHAPE

CASE_ID = "BraTS-PED-00001-000"
SPACING = np.array(BRATS_SHAPE) / np.array(SMALL_SHAPE)


@pytest.fixture(scope="module")
def anatomy() -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(images, 2023 label map, affine) of one synthetic case with enhancing tumour, in BraTS (LPS) orientation."""
    return make_case(0, SMALL_SHAPE, with_et=True)


def write(root: Path, images: dict[str, np.ndarray], seg: np.ndarray | None, affine: np.ndarray) -> Path:
    """The case folder written under `root` in the BraTS layout."""
    write_case(root / CASE_ID, CASE_ID, images, seg, affine)
    return root / CASE_ID


def axial_panels(figure: Figure) -> dict[str, Axes]:
    """The axial row's panels by column title (only the top row has titles)."""
    return {ax.get_title(): ax for ax in figure.axes if ax.get_title()}


def first_panel(figure: Figure, view: str) -> Axes:
    """The T1c panel of a view's row (the one labelled with the view)."""
    return next(ax for ax in figure.axes if ax.get_ylabel().startswith(view))


def pixel(rgb: np.ndarray, ax: Axes, voxel: tuple[int, int]) -> np.ndarray:
    """The drawn colour of axial panel `ax` at RAS voxel (x, y) of its slice; panels are drawn in millimetres."""
    x, y = ax.transData.transform((np.array(voxel) + 0.5) * SPACING[:2])
    return rgb[int(rgb.shape[0] - y), int(x)].astype(int)


def blend(grey: np.ndarray, abbreviation: str) -> np.ndarray:
    return (1 - LABEL_OPACITY) * grey + LABEL_OPACITY * np.array(LABEL_COLOURS[abbreviation])


def test_labels_are_drawn_in_their_colour_where_they_are(anatomy, tmp_path):
    images, _, affine = anatomy
    seg = np.zeros(SMALL_SHAPE, np.uint8)
    seg[40:48, 20:28, 16:24] = 3  # ET; the grid is LPS, so these are RAS voxels 16..23 along x and 36..43 along y
    prediction = np.zeros_like(seg)
    prediction[16:24, 36:44, 18:22] = 1  # NCR in the same axial slices: RAS 40..47 along x, 20..27 along y
    predicted = tmp_path / "prediction.nii.gz"
    nib.save(nib.Nifti1Image(prediction, affine), predicted)

    figure = case_figure(write(tmp_path, images, seg, affine), predicted)
    rgb = figure_rgb(figure)
    panels = axial_panels(figure)
    t1c, truth, prediction_panel = panels["T1c"], panels["ground truth on T1c"], panels["prediction on T1c"]
    et, ncr = (20, 40), (44, 24)
    assert np.abs(pixel(rgb, truth, et) - blend(pixel(rgb, t1c, et), "ET")).max() <= 1
    assert np.array_equal(pixel(rgb, truth, ncr), pixel(rgb, t1c, ncr))
    assert np.abs(pixel(rgb, prediction_panel, ncr) - blend(pixel(rgb, t1c, ncr), "NCR")).max() <= 1
    assert np.array_equal(pixel(rgb, prediction_panel, et), pixel(rgb, t1c, et))
    # Radiological view: the patient's right (higher RAS x) on the left of the panel.
    assert truth.transData.transform((10, 0))[0] > truth.transData.transform((100, 0))[0]


def test_tumour_centre_is_the_ground_truth_then_the_prediction_then_the_volume_centre():
    truth, prediction = np.zeros((10, 10, 10), np.intp), np.zeros((10, 10, 10), np.intp)
    assert tumour_centre([truth, prediction], (10, 11, 12)) == (5, 5, 6)
    prediction[1:4, 2, 5:8] = 1
    assert tumour_centre([truth, prediction], truth.shape) == (2, 2, 6)
    truth[6:9, 6:9, 6:9] = 3
    assert tumour_centre([truth, prediction], truth.shape) == (7, 7, 7)


def test_a_case_without_tumour_gets_a_picture_with_nothing_drawn(anatomy, tmp_path):
    images, _, affine = anatomy
    figure = case_figure(write(tmp_path, images, np.zeros(SMALL_SHAPE, np.uint8), affine))
    for row in ("axial", "coronal", "sagittal"):
        t1c = first_panel(figure, row)
        truth = figure.axes[figure.axes.index(t1c) + 4]
        assert np.array_equal(truth.get_images()[0].get_array(), t1c.get_images()[0].get_array())
    assert figure_rgb(figure).ndim == 3


def test_a_case_without_enhancing_tumour_is_drawn_without_its_colour(anatomy, tmp_path):
    images, seg, affine = anatomy
    figure = case_figure(write(tmp_path, images, np.where(seg == 3, 1, seg).astype(np.uint8), affine))
    drawn = set()
    for row in ("axial", "coronal", "sagittal"):
        t1c = first_panel(figure, row)
        grey = t1c.get_images()[0].get_array().astype(float)
        overlay = figure.axes[figure.axes.index(t1c) + 4].get_images()[0].get_array().astype(float)
        coloured = (overlay != grey).any(axis=-1)
        colours = np.round((overlay[coloured] - (1 - LABEL_OPACITY) * grey[coloured]) / LABEL_OPACITY)
        for abbreviation, colour in LABEL_COLOURS.items():
            if (np.abs(colours - colour).max(axis=-1) <= 2).any():
                drawn.add(abbreviation)
    assert drawn == {"NCR", "ED"}


def test_anisotropic_voxels_keep_their_proportions(anatomy, tmp_path):
    images, seg, affine = anatomy
    thick = affine.copy()
    thick[:3, 2] *= 3  # slices 3x thicker: the same voxels cover 3x the height
    proportions = {}
    for name, grid in (("fine", affine), ("thick", thick)):
        figure = case_figure(write(tmp_path / name, images, seg, grid))
        figure_rgb(figure)
        for view in ("axial", "coronal"):
            box = first_panel(figure, view).get_images()[0].get_window_extent()
            proportions[name, view] = abs(box.height / box.width)  # the x axis runs right to left
    assert proportions["fine", "axial"] == pytest.approx(1.0, rel=0.02)
    assert proportions["thick", "axial"] == pytest.approx(1.0, rel=0.02)
    assert proportions["fine", "coronal"] == pytest.approx(155 / 240, rel=0.02)
    assert proportions["thick", "coronal"] == pytest.approx(3 * proportions["fine", "coronal"], rel=0.02)


def test_any_orientation_gives_the_same_picture(anatomy, tmp_path):
    images, seg, affine = anatomy
    assert nib.aff2axcodes(affine) == ("L", "P", "S")  # as BraTS files
    ornt = nib.orientations
    transform = ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt(("S", "R", "A")))

    def turned(volume: np.ndarray) -> nib.Nifti1Image:
        return nib.Nifti1Image(volume, affine).as_reoriented(transform)

    turned_images = {modality: np.asarray(turned(volume).dataobj) for modality, volume in images.items()}
    turned_affine = turned(seg).affine
    assert nib.aff2axcodes(turned_affine) == ("S", "R", "A")
    original = render_case(write(tmp_path / "lps", images, seg, affine))
    copy = render_case(write(tmp_path / "sra", turned_images, np.asarray(turned(seg).dataobj), turned_affine))
    assert np.array_equal(original, copy)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_legend_names_the_labels_of_the_scheme_in_their_colours(anatomy, tmp_path, scheme):
    images, _, affine = anatomy
    figure = case_figure(write(tmp_path, images, None, affine), label_scheme=scheme)
    (legend,) = figure.legends
    labels = SCHEMES[scheme].labels
    names = SCHEMES[scheme].label_names()
    assert [text.get_text() for text in legend.get_texts()] == [f"{value}: {names[value]}" for value in labels]
    colours = [tuple(round(c * 255) for c in patch.get_facecolor()[:3]) for patch in legend.get_patches()]
    assert colours == [LABEL_COLOURS[abbreviation] for abbreviation, _ in labels.values()]


def test_each_label_abbreviation_has_its_own_colour():
    abbreviations = {abbreviation for scheme in SCHEMES.values() for abbreviation, _ in scheme.labels.values()}
    assert abbreviations <= set(LABEL_COLOURS)
    assert len(set(LABEL_COLOURS.values())) == len(LABEL_COLOURS)


def test_bad_inputs_are_refused_naming_the_file(anatomy, tmp_path):
    images, seg, affine = anatomy
    with pytest.raises(InputError, match=re.escape(f"case folder not found: {tmp_path / 'missing'}")):
        case_figure(tmp_path / "missing")
    case_dir = write(tmp_path, images, seg, affine)
    coarse, shifted = tmp_path / "coarse.nii.gz", tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image(seg[::2, ::2, ::2], affine), coarse)
    moved = affine.copy()
    moved[:3, 3] += 5
    nib.save(nib.Nifti1Image(seg, moved), shifted)
    with pytest.raises(InputError, match=re.escape(f"{coarse}: shape (32, 32, 20) differs")):
        case_figure(case_dir, coarse)
    with pytest.raises(InputError, match=re.escape(f"{shifted}: affine differs")):
        case_figure(case_dir, shifted)
    seg_path = case_dir / f"{CASE_ID}-seg.nii.gz"
    with pytest.raises(InputError, match=re.escape(f"{seg_path}: label values [3] outside [0, 1, 2, 4]")):
        case_figure(case_dir, label_scheme="brats2021")
    with pytest.raises(InputError, match="background must be one of t1c, t1n, t2f, t2w"):
        case_figure(case_dir, background="flair")


def test_cli_writes_the_png_and_refuses_a_missing_case(anatomy, tmp_path, monkeypatch, capsys):
    case_dir = write(tmp_path / "data", *anatomy)
    monkeypatch.chdir(tmp_path)
    fire.Fire(main, ["--case", str(case_dir)])
    assert capsys.readouterr().out == f"wrote {CASE_ID}.png\n"
    written = tmp_path / f"{CASE_ID}.png"
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(written).shape[:2] == render_case(case_dir).shape[:2]
    assert [path.name for path in tmp_path.iterdir() if path.is_file()] == [written.name]

    missing = tmp_path / "missing"
    with pytest.raises(SystemExit) as exit_info:
        fire.Fire(main, ["--case", str(missing)])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.splitlines() == [f"error: case folder not found: {missing}"]
