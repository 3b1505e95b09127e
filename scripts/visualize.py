"""Pictures of a case: the slices through the tumour's centre, with the ground truth and a prediction drawn on them.

``python -m scripts.visualize --case DIR [--prediction FILE] [--output PNG] [--label_scheme S] [--background t2f]``

One figure: a row per view (axial, coronal, sagittal) through the tumour's centre (the centre of mass of the
ground truth, else of the prediction, else the volume's centre), a column per modality, then the ground truth (when
the case has one) and the prediction (when given) drawn over T1c (or ``background``), and a legend naming the
labels of the label scheme. Each label abbreviation has one colour in every scheme (ET is always yellow).

Volumes are reoriented to RAS and drawn in millimetres, so any orientation or spacing gives the same unsquashed
picture. Views are radiological, as in ITK-SNAP: the patient's right on the left (axial, coronal), anterior on the
left (sagittal), anterior or superior up. Drawing uses matplotlib's Agg canvas and never a display. The picture is
written to ``--output``, by default ``<case>.png`` in the current folder (never into a data folder).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from scipy import ndimage

from scripts.atomic import atomic_output
from scripts.cases import MODALITIES, case_files, check_case, volume_problem
from scripts.errors import InputError, exit_on_input_error
from scripts.labels import DEFAULT_SCHEME, LabelScheme, get_scheme

# RGB per label abbreviation, shared by every scheme; core tissues warm, fluid and edema cool.
LABEL_COLOURS = {
    "NCR": (230, 50, 50),
    "NET": (245, 140, 30),
    "CC": (60, 120, 245),
    "ED": (60, 200, 90),
    "ET": (255, 230, 30),
}
LABEL_OPACITY = 0.5
VIEWS = {"axial": 2, "coronal": 1, "sagittal": 0}  # view -> the RAS axis it cuts across
MODALITY_TITLES = {"t1c": "T1c", "t1n": "T1n", "t2f": "T2-FLAIR", "t2w": "T2w"}
INTENSITY_PERCENTILES = (0.5, 99.5)  # of the non-zero voxels: black and white, robust to a few bright voxels
PANEL_INCHES = 2.2
DPI = 100


def _ras(path: str) -> nib.Nifti1Image:
    """A volume reoriented to RAS (axes permuted and flipped only, voxels untouched)."""
    return nib.as_closest_canonical(nib.load(path))


def _read_case(
    case_dir: str | Path, prediction: str | Path | None, scheme: LabelScheme
) -> tuple[str, dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """(case id, {modality: voxels}, {"ground truth" / "prediction": label map}, affine), all in RAS; InputError
    with one "case: file: reason" line per bad file."""
    if not Path(case_dir).is_dir():
        raise InputError(f"case folder not found: {case_dir}")
    case = case_files(case_dir)
    problems = check_case(case, check_data=False)
    if prediction is not None:
        # Checked as the segmentation of a case made of the T1c alone: on its grid (shape and affine) or refused.
        as_label = check_case({**case, "image": case["image"][:1], "label": str(prediction)}, check_data=False)
        problems = list(dict.fromkeys(problems + as_label))
    if problems:
        raise InputError(problems)
    paths = dict(zip(MODALITIES, case["image"], strict=True))
    label_paths = {"ground truth": case["label"], "prediction": prediction}
    volumes = {key: _ras(str(path)) for key, path in (paths | label_paths).items() if path is not None}
    data = {key: np.asanyarray(volume.dataobj) for key, volume in volumes.items()}
    problems = [
        f"{case['case']}: {path}: {problem}"
        for key, path in (paths | label_paths).items()
        if key in data and (problem := volume_problem(data[key], key in label_paths, scheme))
    ]
    if problems:
        raise InputError(problems)
    images = {key: data[key] for key in MODALITIES}
    labels = {key: data[key].astype(np.intp) for key in label_paths if key in data}
    return case["case"], images, labels, volumes["t1c"].affine


def tumour_centre(label_maps: Sequence[np.ndarray], shape: Sequence[int]) -> tuple[int, int, int]:
    """Voxel at the centre of mass of the first label map that holds tumour, else the centre of `shape`."""
    for label in label_maps:
        if label.any():
            return tuple(int(round(c)) for c in ndimage.center_of_mass(label > 0))
    return tuple(int(n) // 2 for n in shape)


def _plane(volume: np.ndarray, view: str, centre: Sequence[int]) -> np.ndarray:
    """The slice of a RAS volume through `centre` across the view's axis, as (rows up the picture, columns)."""
    axis = VIEWS[view]
    return np.take(volume, centre[axis], axis=axis).T


def _extent(shape: Sequence[int], spacing: np.ndarray, view: str) -> tuple[float, float, float, float]:
    """The view's slice in millimetres (imshow's left, right, bottom, top), so that pixels keep the voxels' aspect."""
    horizontal, vertical = (axis for axis in range(3) if axis != VIEWS[view])
    return 0.0, shape[horizontal] * spacing[horizontal], 0.0, shape[vertical] * spacing[vertical]


def intensity_window(volume: np.ndarray) -> tuple[float, float]:
    """The intensities drawn black and white."""
    low, high = np.percentile(volume[volume != 0], INTENSITY_PERCENTILES)
    return float(low), float(max(high, low + 1e-6))


def grey_rgb(plane: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """A slice as a grey (H, W, 3) uint8 picture."""
    low, high = window
    grey = np.round(np.clip((plane - low) / (high - low), 0, 1) * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def colour_table(scheme: LabelScheme) -> np.ndarray:
    """(max label + 1, 3) RGB of each label value of `scheme`; background black, never drawn."""
    table = np.zeros((max(scheme.values) + 1, 3))
    for value, (abbreviation, _) in scheme.labels.items():
        table[value] = LABEL_COLOURS[abbreviation]
    return table


def overlay_labels(grey: np.ndarray, label: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Label colours blended over a grey picture at LABEL_OPACITY where there is a label."""
    blended = np.round((1 - LABEL_OPACITY) * grey + LABEL_OPACITY * colours[label]).astype(np.uint8)
    return np.where((label > 0)[..., None], blended, grey)


def legend_entries(label_scheme: str | LabelScheme = DEFAULT_SCHEME) -> list[tuple[str, tuple[int, int, int]]]:
    """("value: ABBR (name)", RGB colour) of each label of the scheme, as the legend shows them."""
    scheme = get_scheme(label_scheme)
    names = scheme.label_names()
    return [
        (f"{value}: {names[value]}", LABEL_COLOURS[abbreviation]) for value, (abbreviation, _) in scheme.labels.items()
    ]


def case_figure(
    case_dir: str | Path,
    prediction: str | Path | None = None,
    label_scheme: str | LabelScheme = DEFAULT_SCHEME,
    background: str = "t1c",
) -> Figure:
    """The case's figure (see the module's description) on an Agg canvas."""
    scheme = get_scheme(label_scheme)
    if background not in MODALITIES:
        raise InputError(f"background must be one of {', '.join(MODALITIES)}, got {background!r}")
    case_id, images, labels, affine = _read_case(case_dir, prediction, scheme)
    shape = images[background].shape
    spacing = nib.affines.voxel_sizes(affine)
    centre = tumour_centre(list(labels.values()), shape)
    position = nib.affines.apply_affine(affine, centre)
    windows = {modality: intensity_window(volume) for modality, volume in images.items()}
    colours = colour_table(scheme)
    titles = [MODALITY_TITLES[modality] for modality in MODALITIES]
    titles += [f"{key} on {MODALITY_TITLES[background]}" for key in labels]

    extents = {view: _extent(shape, spacing, view) for view in VIEWS}
    # Rows as tall as their slices are at the columns' width, so that no row is padded with white.
    heights = [(top - bottom) / (right - left) for left, right, bottom, top in extents.values()]
    figure = Figure(
        figsize=(PANEL_INCHES * len(titles), PANEL_INCHES * sum(heights) + 1.0), dpi=DPI, layout="constrained"
    )
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(VIEWS), len(titles), squeeze=False, height_ratios=heights)
    for row, view in zip(axes, VIEWS, strict=True):
        pictures = [grey_rgb(_plane(images[modality], view, centre), windows[modality]) for modality in MODALITIES]
        under = grey_rgb(_plane(images[background], view, centre), windows[background])
        pictures += [overlay_labels(under, _plane(label, view, centre), colours) for label in labels.values()]
        for ax, picture in zip(row, pictures, strict=True):
            ax.imshow(picture, origin="lower", extent=extents[view], interpolation="nearest")
            ax.invert_xaxis()  # radiological: the patient's right (or anterior) on the left
            ax.set_xticks([])
            ax.set_yticks([])
        axis = VIEWS[view]
        row[0].set_ylabel(f"{view}\n{'xyz'[axis]} = {position[axis]:.0f} mm")
    for ax, title in zip(axes[0], titles, strict=True):
        ax.set_title(title)
    handles = [Patch(facecolor=np.array(colour) / 255, label=text) for text, colour in legend_entries(scheme)]
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    figure.suptitle(f"{case_id}: labels of {scheme.name} ({scheme.title})")
    return figure


def figure_rgb(figure: Figure) -> np.ndarray:
    """The drawn figure as an (H, W, 3) uint8 array."""
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def render_case(
    case_dir: str | Path,
    prediction: str | Path | None = None,
    label_scheme: str | LabelScheme = DEFAULT_SCHEME,
    background: str = "t1c",
) -> np.ndarray:
    """The case's figure as an (H, W, 3) uint8 array."""
    return figure_rgb(case_figure(case_dir, prediction, label_scheme, background))


def save_case_overlay(
    case_dir: str | Path,
    output: str | Path | None = None,
    prediction: str | Path | None = None,
    label_scheme: str | LabelScheme = DEFAULT_SCHEME,
    background: str = "t1c",
) -> Path:
    """Write the case's figure as a PNG (atomically) to `output`, by default ``<case>.png`` in the current folder;
    returns its path."""
    figure = case_figure(case_dir, prediction, label_scheme, background)
    output = Path(output) if output is not None else Path(f"{Path(case_dir).absolute().name}.png")
    with atomic_output(output, suffix=".png") as temporary:
        figure.savefig(temporary, dpi=DPI)
    return output


def main(
    case: str,
    prediction: str | None = None,
    output: str | None = None,
    label_scheme: str = DEFAULT_SCHEME,
    background: str = "t1c",
) -> None:
    """Draw the slices through the tumour's centre of the case folder CASE: its four modalities, its ground truth
    (if it has a -seg file) and --prediction (a label map on the case's grid) over --background (t1c, or t2f for
    FLAIR), with the labels of --label_scheme (brats2023_ped, brats2024_ped, brats2021); written to --output
    (default: <case>.png in the current folder)."""
    with exit_on_input_error():
        path = save_case_overlay(str(case), output, prediction, label_scheme, background)
    print(f"wrote {path}")


if __name__ == "__main__":
    fire.Fire(main)
