"""A 2D network on 3D volumes: run slice by slice along the axial axis, optionally with neighbouring slices as
extra input channels (2.5D), so that the 3D pipeline (crops, sliding window, inversion to the input grid,
post-processing, metrics) serves a 2D network unchanged.

MONAI's SliceInferer runs a 2D network on each slice alone; the 2.5D input needs each slice's neighbours, and the
bundle's validation and inference take a 3D network, so the slicing lives in the network instead. With no context
the result equals SliceInferer's (tests/test_slices.py checks this).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class SliceWise(torch.nn.Module):
    """Wraps a 2D `network` into a 3D one: (B, C, H, W, D) -> (B, out, H, W, D), axial slice by axial slice.

    Each slice goes in with its `context` neighbours on either side as channels: modality-major, slices in
    order (t1c at z-k..z+k, then t1n, ...), so the 2D network takes ``C * (2 * context + 1)`` channels. At the
    ends of the input the missing neighbours repeat the end slice. `slices_per_pass` bounds the memory of a pass.
    """

    def __init__(self, network: torch.nn.Module, context: int = 0, slices_per_pass: int = 32):
        super().__init__()
        if context < 0 or slices_per_pass < 1:
            raise ValueError(f"context must be >= 0 and slices_per_pass >= 1, got {context} and {slices_per_pass}")
        self.network = network
        self.context = context
        self.slices_per_pass = slices_per_pass

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width, depth = volume.shape
        stack_size = 2 * self.context + 1
        if self.context:
            # F.pad's replicate mode pads every spatial axis of a 5D tensor at once; only depth is padded here.
            first, last = volume[..., :1], volume[..., -1:]
            volume = torch.cat([first] * self.context + [volume] + [last] * self.context, dim=-1)
        outputs = []
        for start in range(0, depth, self.slices_per_pass):
            count = min(self.slices_per_pass, depth - start)
            stacks = volume[..., start : start + count + 2 * self.context].unfold(-1, stack_size, 1)
            # (B, C, H, W, count, stack) -> (B * count, C * stack, H, W)
            stacks = stacks.permute(0, 4, 1, 5, 2, 3).reshape(batch * count, channels * stack_size, height, width)
            logits = self.network(stacks)
            outputs.append(logits.reshape(batch, count, -1, height, width))
        return torch.cat(outputs, dim=1).permute(0, 2, 3, 4, 1)


class CentreSlicesLoss(torch.nn.Module):
    """`loss` over the slices whose neighbours all lie inside the crop: a 2.5D training crop of 2k+1 slices
    trains its centre slice, which sees its true neighbours, as every inner slice does at inference."""

    def __init__(self, loss: torch.nn.Module, context: int = 0):
        super().__init__()
        self.loss = loss
        self.context = context

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.context:
            if prediction.shape[-1] <= 2 * self.context:
                raise ValueError(
                    f"a crop of {prediction.shape[-1]} slices has none with {self.context} neighbours on either side"
                )
            inner = slice(self.context, -self.context)
            prediction, target = prediction[..., inner], target[..., inner]
        return self.loss(prediction, target)


def slice_window(field_of_view: float, spacing: Sequence[float], multiple: int = 16) -> list[int]:
    """The in-plane window, in voxels, that spans `field_of_view` mm at `spacing`, rounded up to a multiple of
    `multiple` (a U-Net of four downsamplings needs 16): 192 mm is 192 voxels at 1 mm and 96 at 2 mm."""
    return [multiple * math.ceil(round(field_of_view / size / multiple, 6)) for size in spacing[:2]]
