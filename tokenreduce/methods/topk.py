"""``topk``: keep the tokens the CLS token attends to most and discard the rest (no fusion)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from tokenreduce.methods.base import LayerContext, PruneAtLayers
from tokenreduce.registry import register_method


@register_method
@dataclass
class TopK(PruneAtLayers):
    """CLS-attention top-k pruning: EViT's selection without its fused token, the common baseline
    of the token-pruning literature."""

    name = "topk"
    paper = "CLS-attention pruning baseline, e.g. Liang et al., ICLR 2022"
    needs_cls_token = True

    def scores(self, ctx: LayerContext) -> Tensor:
        return ctx.cls_attention()[:, ctx.num_prefix :]
