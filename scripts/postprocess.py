"""Post-processing of predicted tumour regions, as dictionary transforms for the configs.

Applied on the input's own grid after inversion: small components are removed per region channel
(the label scheme's network regions), then regions become the scheme's label map, then the 2023
BraTS-PED winner's rule turns a tiny enhancing tumour into the scheme's non-enhancing label.

Everything here needs only MONAI, NumPy and SciPy, which MONAI Label installs too: it runs the inference config as it
is and installs none of the bundle's other packages (components are labelled with SciPy, not cc3d, for that reason;
MONAI's RemoveSmallObjects would need scikit-image, which the bundle does not declare).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type, convert_to_numpy
from scipy import ndimage

from scripts.labels import DEFAULT_SCHEME, get_scheme

_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


def without_small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """A 3D boolean mask without its 26-connected components of fewer than `min_voxels` voxels."""
    components, _ = ndimage.label(mask, structure=_CONNECTIVITY_26)
    sizes = np.bincount(components.ravel())
    keep = sizes >= min_voxels
    keep[0] = False  # background
    return keep[components]


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


class MaskOutsideInputd(MapTransform):
    """Zero predictions wherever every channel of `source_key` is 0: outside the skull-stripped brain
    there is no tumour, yet a network may mark speckles there (notably along the brain's edge once a
    coarse prediction is resampled back), which the lesion-wise metrics count as false positives.
    Needs the prediction and the source on the same grid: the input as loaded, after inversion."""

    def __init__(self, keys: KeysCollection, source_key: str = "image", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.source_key = source_key

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        inside = (d[self.source_key] != 0).any(0, keepdim=True)
        for key in self.key_iterator(d):
            d[key] = d[key] * convert_to_dst_type(inside, dst=d[key])[0]
        return d
