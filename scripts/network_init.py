"""Output-bias initialisation so that sigmoid outputs start at the regions' prior probability."""

from __future__ import annotations

import math

import torch


def set_output_prior(network: torch.nn.Module, prior: float) -> torch.nn.Module:
    """Set the bias of the network's last convolution to logit(`prior`).

    With a zero bias every voxel starts at probability 0.5, and the Dice gradient of the many false
    positives of small regions (TC, ET) is tiny, so those regions start learning late; starting from
    their prevalence (a few percent of the volume) they learn as early as WT (cf. RetinaNet's prior init).
    """
    if not 0.0 < prior < 1.0:
        raise ValueError(f"prior must be within (0, 1), got {prior}")
    convolutions = [module for module in network.modules() if isinstance(module, torch.nn.modules.conv._ConvNd)]
    if not convolutions or convolutions[-1].bias is None:
        raise ValueError(f"{type(network).__name__} has no final convolution with a bias to initialise")
    with torch.no_grad():
        convolutions[-1].bias.fill_(math.log(prior / (1.0 - prior)))
    return network
