"""``divprune``: DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large
Multimodal Models", CVPR 2025)."""

from __future__ import annotations

from dataclasses import dataclass

from tokenreduce.core import Selection, keep, max_min_subset
from tokenreduce.methods.visual import VisualContext, VisualMethod
from tokenreduce.registry import register_method


@register_method
@dataclass
class DivPrune(VisualMethod):
    """Keep a greedy max-min diverse subset (cosine distance) of each image's projected visual tokens.

    As in the reference (``vbdi/divprune``, read at HEAD): the budget is ``round(keep_ratio * N)``, the
    first token is the one farthest from its nearest neighbour, each next one maximises its distance to
    the nearest token already kept, and the kept tokens go to the LLM in their original order.
    Distances are computed in float32 whatever the model's dtype. Default ``keep_ratio=0.098`` (the
    paper's ``SUBSET_RATIO``, 56 of LLaVA-1.5's 576 tokens).
    """

    name = "divprune"
    paper = "Alvar et al., DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models, CVPR 2025"
    default_keep_ratio = 0.098

    def select(self, ctx: VisualContext) -> Selection:
        picked = max_min_subset(ctx.features, ctx.keep)
        return keep(picked.sort(dim=1).values, ctx.features.shape[1])
