"""BraTS 2023 label map <-> nested tumour regions (TC, WT, ET).

The 2023 labels are 1 = non-enhancing core (NCR), 2 = edema (ED), 3 = enhancing tumour (ET).
MONAI's ``ConvertToMultiChannelBasedOnBratsClasses`` expects the 2018-21 scheme (ET = 4) and
silently returns an empty ET on 2023 data, hence this module.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type

LABEL_NAMES = {0: "background", 1: "non-enhancing tumour core", 2: "edema", 3: "enhancing tumour"}
REGIONS = ("TC", "WT", "ET")
REGION_LABELS = {"TC": (1, 3), "WT": (1, 2, 3), "ET": (3,)}
VALID_LABELS = frozenset(LABEL_NAMES)


def labels_to_regions(label: NdarrayOrTensor) -> NdarrayOrTensor:
    """Label map (optionally with a leading channel of size 1) -> boolean [TC, WT, ET] channels."""
    if label.ndim == 4:
        if label.shape[0] != 1:
            raise ValueError(f"expected a single-channel label map, got shape {tuple(label.shape)}")
        label = label[0]
    stack = torch.stack if isinstance(label, torch.Tensor) else np.stack
    return stack([(label == 1) | (label == 3), label > 0, label == 3])


def regions_to_labels(regions: NdarrayOrTensor) -> NdarrayOrTensor:
    """Binary [TC, WT, ET] channels -> single-channel 2023 label map (uint8).

    3 where ET, else 1 where TC, else 2 where WT, else 0; so an ET voxel outside TC or WT
    still becomes enhancing tumour, which keeps ET inside TC inside WT in the output.
    """
    if regions.shape[0] != 3:
        raise ValueError(f"expected 3 region channels [TC, WT, ET], got shape {tuple(regions.shape)}")
    tc, wt, et = (regions[i] > 0 for i in range(3))
    if isinstance(regions, torch.Tensor):
        label = torch.zeros(regions.shape[1:], dtype=torch.uint8, device=regions.device)
    else:
        label = np.zeros(regions.shape[1:], dtype=np.uint8)
    label[wt] = 2
    label[tc] = 1
    label[et] = 3
    return label[None]


class LabelsToRegionsd(MapTransform):
    """Dictionary transform: 2023 label map -> float [TC, WT, ET] channels (keeps MetaTensor meta)."""

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = convert_to_dst_type(labels_to_regions(d[key]), dst=d[key], dtype=torch.float32)[0]
        return d


class RegionsToLabelsd(MapTransform):
    """Dictionary transform: binary [TC, WT, ET] channels -> 2023 label map (keeps MetaTensor meta)."""

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = convert_to_dst_type(regions_to_labels(d[key]), dst=d[key], dtype=torch.uint8)[0]
        return d


def region_output_transform(region: str) -> Callable[[Sequence[Mapping]], tuple[list, list]]:
    """Ignite output transform selecting one region channel of a batch of decollated
    {"pred", "label"} dicts, so that a MeanDice handler reports that region alone."""
    index = REGIONS.index(region)

    def select(batch: Sequence[Mapping]) -> tuple[list, list]:
        return [item["pred"][index : index + 1] for item in batch], [item["label"][index : index + 1] for item in batch]

    return select
