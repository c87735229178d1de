"""``random``: a seeded random subset of tokens, inside an encoder on ``topk``'s schedule or before a VLM's LLM."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from tokenreduce.core import Selection, hash_scores, keep
from tokenreduce.methods.base import LayerContext, PruneAtLayers
from tokenreduce.methods.visual import VisualContext, VisualMethod
from tokenreduce.registry import register_method
from tokenreduce.validate import as_int


@register_method
@dataclass
class RandomPrune(PruneAtLayers):
    """The floor any scoring rule must beat. The draw is a fixed hash of ``seed``, the layer and the
    token position, so it is the same for every sample of a batch, every forward and every device."""

    name = "random"
    paper = "random-selection baseline"

    seed: int = 0

    needs_cls_token = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.seed = as_int("seed", self.seed, 0)

    def scores(self, ctx: LayerContext) -> Tensor:
        b, n = ctx.k.shape[0], ctx.k.shape[2] - ctx.num_prefix
        return hash_scores(n, self.seed * 1_000_003 + ctx.layer, ctx.k.device).expand(b, -1)


@register_method
@dataclass
class RandomVisual(VisualMethod):
    """Keep a seeded random subset of each image's (and video's) visual tokens before the LLM, in their
    original order. The draw is a fixed hash of ``seed`` and the token position: the same for every image,
    forward and device."""

    name = "random"
    paper = "random-selection baseline"
    modalities = frozenset({"image", "video"})  # a plain subset: a video's tokens are drawn as an image's

    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.seed = as_int("seed", self.seed, 0)

    def select(self, ctx: VisualContext) -> Selection:
        m, n = ctx.features.shape[:2]
        scores = hash_scores(n, self.seed, ctx.features.device).expand(m, -1)
        return keep(scores.topk(ctx.keep, dim=1).indices.sort(dim=1).values, n)
