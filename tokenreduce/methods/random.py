"""``random``: keep a seeded random subset of tokens on the same schedule as ``topk``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokenreduce.methods.base import LayerContext, PruneAtLayers
from tokenreduce.registry import register_method


@register_method
@dataclass
class RandomPrune(PruneAtLayers):
    """The floor any scoring rule must beat. The draw depends only on ``seed``, the layer and the token
    count, so it is the same for every sample of a batch and every forward."""

    name = "random"
    paper = "random-selection baseline"

    seed: int = 0

    def scores(self, ctx: LayerContext) -> Tensor:
        b, n = ctx.k.shape[0], ctx.k.shape[2] - ctx.num_prefix
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.layer)
        return torch.rand(n, generator=gen).to(ctx.k.device).expand(b, -1)
