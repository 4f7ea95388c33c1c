"""The reconstruction-loss axis (the KL term belongs to the prior: priors.py).

A loss option (``conf/loss/<name>.yaml``) names its function as ``_target_``: it takes the
decoder's logits and the images and returns one value per image, summed over the pixels; the
VAE weighs it by the option's ``c`` and averages over the batch. The decoder returns logits:
BCE is computed from them directly (numerically stable), L1 and L2 on the pixel means
sigmoid(logits). A loss of your own is a function of that form and a config file naming it
(docs/extending.md).
"""

import functools
import importlib
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F


def bce(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def l1(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(logits) - x).abs().flatten(1).sum(1)


def l2(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(logits) - x).square().flatten(1).sum(1)


# The project's losses by name: the evaluation computes all three for every run (test/recon_<name>).
RECON_LOSSES = {"bce": bce, "l1": l1, "l2": l2}


def recon_loss(option: Mapping) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The reconstruction loss that a ``loss`` option names: the function of its ``_target_``
    (config.validate has checked that it imports), with the option's other settings than
    ``name`` and ``c`` as keyword arguments; or, for a run logged before loss options named a
    function, the project's loss of its ``name``."""
    target = option.get("_target_")
    if not target:
        return RECON_LOSSES[option["name"]]
    module, _, name = target.rpartition(".")
    function = getattr(importlib.import_module(module), name)
    settings = {key: value for key, value in option.items() if key not in ("name", "c", "_target_")}
    return functools.partial(function, **settings) if settings else function

