"""``tofu``: Token Fusion (Kim et al., "Token Fusion: Bridging the Gap between Token Pruning and Token
Merging", WACV 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from tokenreduce.core import Selection, bipartite_soft_matching, rescale_to_max_norm
from tokenreduce.methods.base import LayerContext
from tokenreduce.methods.tome import ToMe
from tokenreduce.registry import register_method
from tokenreduce.validate import as_int

MERGES = ("mlerp", "mean", "reference")
SPLITS = ("paper", "reference")


@register_method
@dataclass
class ToFu(ToMe):
    """ToMe's bipartite matching, pruning in the early blocks and norm-preserving merging in the later ones.

    Every block matches as :class:`~tokenreduce.methods.tome.ToMe` does (keys averaged over heads, A/B by
    position parity, the ``r`` strongest edges) and removes ``r`` tokens; ``r`` / ``keep_ratio`` /
    ``clip`` / ``prop_attn`` mean what they mean for ``tome`` (same schedule, same defaults: r=13 on a
    197-token, 12-block ViT, the paper's ViT-S setting). The first ``d`` blocks prune (each source is
    dropped, its destination unchanged); the later ones merge each group by MLERP,
    ``out = mean / ||mean|| * max_k ||x_k||``: the direction of the group's (size-weighted) mean and the
    largest norm in the group, so merging does not shrink the feature norm.

    The paper's split is ``l < d`` with ``d = L / 2`` (6 of 12 blocks prune); ``prune_layers="paper"``
    takes ``ceil(L / 2)`` for any depth (the paper gives only ``L = 12``). There is no code from the
    authors; the third-party code (``hchautran/PiToMe`` ``algo/tofu``, copied into OpenToMe) differs, and
    its choices are options here:

    - ``merge="reference"``: the plain (unweighted) mean of the group, divided by the norm of the
      destination **before** merging, times the largest norm: ``mean / ||x_dst|| * max_k ||x_k||``.
      ``merge="mean"`` is the plain ToMe size-weighted mean (the paper's "ToFu-average" ablation).
    - ``prune_layers="reference"``: prune where ``l <= L // 2`` (7 of 12 blocks); an int is the number of
      leading pruning blocks.
    - It counts ``r = floor(T - T * ratio)`` with T including CLS and no 50% cap, and tracks no sizes
      (its proportional attention is therefore a no-op): pass ``r`` as a per-block list and
      ``prop_attn=False`` to reproduce it.

    Pruning blocks leave the destination's size as it was (the dropped tokens' mass is gone, as in any
    pruning); merging blocks add sizes. Proportional attention is on by default, as in ToMe, whose code
    the paper extends (the paper's own setting is not verified).
    """

    name = "tofu"
    paper = "Kim et al., Token Fusion: Bridging the Gap between Token Pruning and Token Merging, WACV 2024"

    merge: str = "mlerp"  # later blocks: "mlerp" (paper), "mean" (ToMe's weighted mean), "reference" (third-party norm)
    prune_layers: int | str = "paper"  # leading pruning blocks: "paper" ceil(L/2), "reference" L//2 + 1, or a count

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {self.merge!r}")
        if isinstance(self.prune_layers, str):
            if self.prune_layers not in SPLITS:
                raise ValueError(f"prune_layers must be one of {SPLITS} or an integer >= 0, got {self.prune_layers!r}")
        else:
            self.prune_layers = as_int("prune_layers", self.prune_layers, 0)

    def pruning_blocks(self, depth: int) -> int:
        """How many leading blocks of ``depth`` prune instead of merging."""
        if self.prune_layers == "paper":
            return math.ceil(depth / 2)
        if self.prune_layers == "reference":
            return depth // 2 + 1
        if self.prune_layers > depth:
            raise ValueError(f"prune_layers must be an integer in [0, {depth}] for this model, got {self.prune_layers}")
        return self.prune_layers

    def schedule(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        self.pruning_blocks(depth)  # checks prune_layers against the model
        return super().schedule(num_tokens, num_prefix, depth)

    def select(self, x: Tensor, ctx: LayerContext) -> Selection | None:
        r = x.shape[1] - ctx.num_out
        if r == 0:
            return None
        if ctx.layer < self.pruning_blocks(ctx.depth):
            return bipartite_soft_matching(ctx.metric(), r, ctx.num_prefix, drop_sources=True)
        weighted = bipartite_soft_matching(ctx.metric(), r, ctx.num_prefix, None if self.merge == "reference" else ctx.size)
        if self.merge == "mean":
            return weighted
        return rescale_to_max_norm(weighted, x, "mean" if self.merge == "mlerp" else "destination")
