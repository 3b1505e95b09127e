"""Label schemes of BraTS data, and the conversion between a label map and the regions the network predicts.

One ``LabelScheme`` holds everything that depends on the label values: the values and their names, the regions
(sets of labels) that the network predicts as sigmoid channels, the regions the official metrics score, how
predicted regions become a label map again, and which official metric rules apply. Every config and script asks
the scheme by name (``label_scheme``); no other module hard-codes a label value.

- ``brats2023_ped`` (default): BraTS 2023 (adult and pediatric): 1 NCR, 2 ED, 3 ET.
- ``brats2024_ped``: the public BraTS-PEDs releases of 2024 on: 1 ET, 2 NET, 3 CC (cyst), 4 ED.
- ``brats2021``: BraTS 2018-2021 adult glioma: 1 NCR, 2 ED, 4 ET (MONAI's ``ConvertToMultiChannelBasedOnBratsClasses``
  expects this one and silently gives an empty ET on 2023 data).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type

from scripts.errors import InputError

DEFAULT_SCHEME = "brats2023_ped"


@dataclass(frozen=True)
class LabelScheme:
    """The labels of one BraTS release and everything the bundle derives from them."""

    name: str
    title: str
    labels: Mapping[int, tuple[str, str]]  # value -> (abbreviation, name); 0 is background
    regions: Mapping[str, frozenset[int]]  # every named region -> the label values it covers
    channels: tuple[str, ...]  # the regions the network predicts, in output-channel order
    scored_regions: tuple[str, ...]  # the regions the official metrics report, in their order
    # Regions back to labels: paint each (channel region, label) in this order, later ones on top.
    paint_order: tuple[tuple[str, int], ...]
    metric_rules: str  # the official lesion-wise rules for this scheme (a key of scripts.metrics.CHALLENGES)
    # The 2023 winner's post-processing relabels small enhancing tumour as this non-enhancing label.
    enhancing_label: int
    non_enhancing_label: int

    def __post_init__(self) -> None:
        unknown = {*self.channels, *self.scored_regions, *(region for region, _ in self.paint_order)} - set(
            self.regions
        )
        if unknown:
            raise ValueError(f"{self.name}: regions {sorted(unknown)} are not defined")

    @property
    def values(self) -> frozenset[int]:
        """Every valid voxel value, background included."""
        return frozenset({0, *self.labels})

    def label_names(self) -> dict[int, str]:
        """{value: "ABBR (name)"} for the non-background labels, e.g. {3: "ET (enhancing tumour)"}."""
        return {value: f"{abbreviation} ({name})" for value, (abbreviation, name) in self.labels.items()}

    def channel_index(self, region: str) -> int:
        return self.channels.index(region)

    def crop_ratios(self, enhancing_weight: float = 1.0, background_weight: float = 1.0) -> list[float]:
        """Weight of each label value 0..max as a crop centre (RandCropByLabelClassesd `ratios`): `background_weight`
        for background, `enhancing_weight` for enhancing tumour, 1 for every other label and 0 for values the scheme
        does not use."""
        weights = {0: background_weight, self.enhancing_label: enhancing_weight}
        return [weights.get(value, float(value in self.values)) for value in range(max(self.values) + 1)]

    def region_mask(self, label: NdarrayOrTensor, region: str) -> NdarrayOrTensor:
        """Boolean mask of `region` in a label map."""
        values = sorted(self.regions[region])
        if isinstance(label, torch.Tensor):
            return torch.isin(label, torch.tensor(values, device=label.device, dtype=label.dtype))
        return np.isin(label, values)

    def labels_to_regions(self, label: NdarrayOrTensor, regions: Sequence[str] | None = None) -> NdarrayOrTensor:
        """Label map (optionally with a leading channel of size 1) -> boolean channels of `regions`
        (default: the network's channels)."""
        if label.ndim == 4:
            if label.shape[0] != 1:
                raise ValueError(f"expected a single-channel label map, got shape {tuple(label.shape)}")
            label = label[0]
        stack = torch.stack if isinstance(label, torch.Tensor) else np.stack
        return stack([self.region_mask(label, region) for region in regions or self.channels])

    def regions_to_labels(self, regions: NdarrayOrTensor) -> NdarrayOrTensor:
        """Binary channels (the network's, in order) -> single-channel uint8 label map, painted in `paint_order`,
        so that a region predicted outside its parent (e.g. ET outside TC) still gets its own label."""
        if regions.shape[0] != len(self.channels):
            raise ValueError(
                f"expected {len(self.channels)} region channels {list(self.channels)} for {self.name}, "
                f"got shape {tuple(regions.shape)}"
            )
        if isinstance(regions, torch.Tensor):
            label = torch.zeros(regions.shape[1:], dtype=torch.uint8, device=regions.device)
        else:
            label = np.zeros(regions.shape[1:], dtype=np.uint8)
        for region, value in self.paint_order:
            label[regions[self.channel_index(region)] > 0] = value
        return label[None]


SCHEMES = MappingProxyType(
    {
        scheme.name: scheme
        for scheme in (
            LabelScheme(
                name="brats2023_ped",
                title="BraTS 2023 (pediatric and adult)",
                labels={
                    1: ("NCR", "non-enhancing tumour core"),
                    2: ("ED", "peritumoral edema"),
                    3: ("ET", "enhancing tumour"),
                },
                regions={"ET": frozenset({3}), "TC": frozenset({1, 3}), "WT": frozenset({1, 2, 3})},
                channels=("TC", "WT", "ET"),
                scored_regions=("ET", "TC", "WT"),
                paint_order=(("WT", 2), ("TC", 1), ("ET", 3)),
                metric_rules="PED",
                enhancing_label=3,
                non_enhancing_label=1,
            ),
            # CC is a channel of its own: from WT, TC, ET and CC every scored region and every label follows
            # (ED = WT - TC, NET = TC - ET - CC), whereas TC, WT, ET alone cannot tell a cyst from NET.
            LabelScheme(
                name="brats2024_ped",
                title="BraTS-PEDs 2024 and later",
                labels={
                    1: ("ET", "enhancing tumour"),
                    2: ("NET", "non-enhancing tumour"),
                    3: ("CC", "cystic component"),
                    4: ("ED", "peritumoral edema"),
                },
                regions={
                    "ET": frozenset({1}),
                    "TC": frozenset({1, 2, 3}),
                    "WT": frozenset({1, 2, 3, 4}),
                    "NETC": frozenset({2}),
                    "CC": frozenset({3}),
                    "ED": frozenset({4}),
                },
                channels=("TC", "WT", "ET", "CC"),
                scored_regions=("ET", "TC", "WT", "NETC", "CC", "ED"),
                paint_order=(("WT", 4), ("TC", 2), ("CC", 3), ("ET", 1)),
                metric_rules="PED2024",
                enhancing_label=1,
                non_enhancing_label=2,
            ),
            LabelScheme(
                name="brats2021",
                title="BraTS 2018-2021 (adult glioma)",
                labels={
                    1: ("NCR", "necrotic and non-enhancing tumour core"),
                    2: ("ED", "peritumoral edema"),
                    4: ("ET", "enhancing tumour"),
                },
                regions={"ET": frozenset({4}), "TC": frozenset({1, 4}), "WT": frozenset({1, 2, 4})},
                channels=("TC", "WT", "ET"),
                scored_regions=("ET", "TC", "WT"),
                paint_order=(("WT", 2), ("TC", 1), ("ET", 4)),
                metric_rules="GLI",
                enhancing_label=4,
                non_enhancing_label=1,
            ),
        )
    }
)


def get_scheme(scheme: str | LabelScheme = DEFAULT_SCHEME) -> LabelScheme:
    """The scheme of that name (a LabelScheme passes through); InputError naming the valid ones otherwise."""
    if isinstance(scheme, LabelScheme):
        return scheme
    if scheme not in SCHEMES:
        raise InputError(f"unknown label_scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    return SCHEMES[scheme]


class LabelsToRegionsd(MapTransform):
    """Dictionary transform: label map -> float channels of the scheme's network regions (keeps MetaTensor meta)."""

    def __init__(self, keys: KeysCollection, label_scheme: str = DEFAULT_SCHEME, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.scheme = get_scheme(label_scheme)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            regions = self.scheme.labels_to_regions(d[key])
            d[key] = convert_to_dst_type(regions, dst=d[key], dtype=torch.float32)[0]
        return d


class RegionsToLabelsd(MapTransform):
    """Dictionary transform: binary channels of the scheme's regions -> its label map (keeps MetaTensor meta)."""

    def __init__(self, keys: KeysCollection, label_scheme: str = DEFAULT_SCHEME, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.scheme = get_scheme(label_scheme)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = convert_to_dst_type(self.scheme.regions_to_labels(d[key]), dst=d[key], dtype=torch.uint8)[0]
        return d


def region_output_transform(
    region: str, label_scheme: str = DEFAULT_SCHEME
) -> Callable[[Sequence[Mapping]], tuple[list, list]]:
    """Ignite output transform selecting one region channel of a batch of decollated {"pred", "label"} dicts, so
    that a MeanDice handler reports that region alone."""
    index = get_scheme(label_scheme).channel_index(region)

    def select(batch: Sequence[Mapping]) -> tuple[list, list]:
        return [item["pred"][index : index + 1] for item in batch], [item["label"][index : index + 1] for item in batch]

    return select
