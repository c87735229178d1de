"""``evit``: EViT token reorganisation (Liang et al., "Not All Patches are What You Need", ICLR 2022),
used training-free."""

from __future__ import annotations

from dataclasses import dataclass

from tokenreduce.methods.base import PruneAtLayers
from tokenreduce.registry import register_method


@register_method
@dataclass
class EViT(PruneAtLayers):
    """At each reduction layer keep the ``keep_rate`` patch tokens the CLS token attends to most and
    fuse the others into one token, weighted by their CLS attention. Paper default: keep_rate 0.7
    at the 4th, 7th and 10th block of DeiT-S."""

    name = "evit"
    paper = "Liang et al., Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations, ICLR 2022"
    fuse = True
