"""Post-processing of predicted tumour regions, as dictionary transforms for the configs.

Applied on the input's own grid after inversion: small components are removed per region channel
(the label scheme's network regions), then regions become the scheme's label map, then the 2023
BraTS-PED winner's rule turns a tiny enhancing tumour into the scheme's non-enhancing label.

Everything here needs only MONAI, NumPy and SciPy, which MONAI Label installs too: it runs the inference config as it
is and installs none of the bundle's other packages (components are labelled with SciPy, not cc3d, for that reason;
MONAI's RemoveSmallObjects would need scikit-image, which the bundle does not declare).
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type, convert_to_numpy
from scipy import ndimage

from scripts.errors import InputError
from scripts.labels import DEFAULT_SCHEME, get_scheme

_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)
# What configs/inference.yaml applies when no post-processing file is there: nothing.
NO_POSTPROCESSING = MappingProxyType({"min_component_voxels": 0, "min_et_fraction": 0.0})


def label_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 26-connected components of a 3D boolean mask (ids, 0 outside it) and the voxel count of each id."""
    components, _ = ndimage.label(mask, structure=_CONNECTIVITY_26)
    return components, np.bincount(components.ravel())


def large_components(components: np.ndarray, sizes: np.ndarray, min_voxels: int) -> np.ndarray:
    """The mask of the components (as `label_components` gives them) of at least `min_voxels` voxels; labelling once
    and thresholding many times is what a search over `min_voxels` needs."""
    keep = sizes >= min_voxels
    keep[0] = False  # background
    return keep[components]


def without_small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """A 3D boolean mask without its 26-connected components of fewer than `min_voxels` voxels."""
    return large_components(*label_components(mask), min_voxels)


class RemoveSmallComponentsd(MapTransform):
    """Remove 26-connected components smaller than `min_voxels` from each binary region channel.

    `min_voxels` is one number for all regions or one per network region of the label scheme, in its channel
    order (e.g. [TC, WT, ET] for brats2023_ped); 0 keeps all.
    """

    def __init__(
        self,
        keys: KeysCollection,
        min_voxels: int | Sequence[int] = 0,
        label_scheme: str = DEFAULT_SCHEME,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        channels = get_scheme(label_scheme).channels
        sizes = [min_voxels] * len(channels) if isinstance(min_voxels, int) else list(min_voxels)
        if len(sizes) != len(channels) or any(size < 0 for size in sizes):
            raise ValueError(
                f"min_voxels must be a non-negative int or one per region {list(channels)}, got {min_voxels}"
            )
        self.min_voxels = sizes

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        if not any(self.min_voxels):
            return d
        for key in self.key_iterator(d):
            regions = convert_to_numpy(d[key]) > 0
            kept = np.stack(
                [
                    without_small_components(channel, size) if size else channel
                    for channel, size in zip(regions, self.min_voxels, strict=True)
                ]
            )
            d[key] = convert_to_dst_type(kept, dst=d[key], dtype=d[key].dtype)[0]
        return d


class SmallEnhancingToNecrosisd(MapTransform):
    """On a label map: if enhancing tumour is less than `min_fraction` of the whole tumour, relabel it as the
    scheme's non-enhancing tumour (the 2023 BraTS-PED winner used 0.04); 0 disables."""

    def __init__(
        self,
        keys: KeysCollection,
        min_fraction: float = 0.0,
        label_scheme: str = DEFAULT_SCHEME,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if not 0.0 <= min_fraction <= 1.0:
            raise ValueError(f"min_fraction must be within [0, 1], got {min_fraction}")
        self.min_fraction = min_fraction
        self.scheme = get_scheme(label_scheme)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        if self.min_fraction == 0.0:
            return d
        for key in self.key_iterator(d):
            label = d[key]
            enhancing = label == self.scheme.enhancing_label
            num_enhancing = int(enhancing.sum())
            if 0 < num_enhancing < self.min_fraction * int((label > 0).sum()):
                label = label.clone() if isinstance(label, torch.Tensor) else label.copy()
                label[enhancing] = self.scheme.non_enhancing_label
                d[key] = label
        return d


def nonzero_anywhere(image: NdarrayOrTensor) -> NdarrayOrTensor:
    """One boolean channel: where any channel of `image` (channels first) is not 0."""
    return (image != 0).any(0, keepdims=True) if isinstance(image, np.ndarray) else (image != 0).any(0, keepdim=True)


class BrainMaskd(MapTransform):
    """Keep where any channel of each key is not 0 (the skull-stripped brain of an input as loaded) under the
    matching name of `names`, for MaskOutsideInputd at the end: one boolean channel rather than a copy of the four
    float32 ones (143 MB of a 240 x 240 x 155 case that would stay in RAM while the network runs)."""

    def __init__(self, keys: KeysCollection, names: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.names = [names] if isinstance(names, str) else list(names)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key, name in self.key_iterator(d, self.names):
            d[name] = nonzero_anywhere(d[key])
        return d


class MaskOutsideInputd(MapTransform):
    """Zero predictions wherever every channel of `source_key` is 0: outside the skull-stripped brain
    there is no tumour, yet a network may mark speckles there (notably along the brain's edge once a
    coarse prediction is resampled back), which the lesion-wise metrics count as false positives.
    Needs the prediction and the source on the same grid: the input as loaded (or its BrainMaskd), after inversion."""

    def __init__(self, keys: KeysCollection, source_key: str = "image", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.source_key = source_key

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        inside = nonzero_anywhere(d[self.source_key])
        for key in self.key_iterator(d):
            d[key] = d[key] * convert_to_dst_type(inside, dst=d[key])[0]
        return d


def read_postprocessing_file(path: str | Path | None, label_scheme: str = DEFAULT_SCHEME) -> dict:
    """The post-processing that ``python -m scripts.tune_postprocessing`` chose and wrote to ``path``:
    ``{"min_component_voxels": [one per network region of the scheme], "min_et_fraction": f}``, as the transforms above
    take them; NO_POSTPROCESSING when ``path`` is None or no file is there.

    InputError naming the file when it cannot be read, holds invalid values, or was tuned for another label scheme (its
    regions and labels would mean something else).
    """
    if path is None or not Path(path).is_file():
        return dict(NO_POSTPROCESSING)
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"post-processing file {path}: cannot read it as JSON ({error})") from None
    if not isinstance(content, dict):
        raise InputError(f"post-processing file {path}: expected a JSON object, as scripts.tune_postprocessing writes")
    scheme = get_scheme(label_scheme)
    if content.get("label_scheme") != scheme.name:
        raise InputError(
            f"post-processing file {path} was tuned for label scheme {content.get('label_scheme')}, but label_scheme "
            f"is {scheme.name}: tune it on evaluations of {scheme.name} (python -m scripts.tune_postprocessing), or "
            "pass --postprocessing_file null"
        )
    sizes, fraction = content.get("min_component_voxels"), content.get("min_et_fraction")
    problems = []
    if not (
        isinstance(sizes, list)
        and len(sizes) == len(scheme.channels)
        and all(type(size) is int and size >= 0 for size in sizes)
    ):
        problems.append(
            f"post-processing file {path}: min_component_voxels must be {len(scheme.channels)} non-negative whole "
            f"numbers, one per region {list(scheme.channels)}, got {sizes!r}"
        )
    if type(fraction) not in (int, float) or not 0.0 <= fraction <= 1.0:
        problems.append(f"post-processing file {path}: min_et_fraction must be a number in [0, 1], got {fraction!r}")
    if problems:
        raise InputError(problems)
    return {"min_component_voxels": sizes, "min_et_fraction": float(fraction)}
