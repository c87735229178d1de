"""``topk``: keep the tokens the CLS token attends to most and discard the rest (no fusion)."""

from __future__ import annotations

from dataclasses import dataclass

from tokenreduce.methods.base import PruneAtLayers
from tokenreduce.registry import register_method


@register_method
@dataclass
class TopK(PruneAtLayers):
    """CLS-attention top-k pruning: EViT's selection without its fused token, the common baseline
    of the token-pruning literature."""

    name = "topk"
    paper = "CLS-attention pruning baseline, e.g. Liang et al., ICLR 2022"
