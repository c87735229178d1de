"""``tome``: Token Merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from tokenreduce.core import bipartite_soft_matching, merge_wavg
from tokenreduce.methods.base import LayerContext, Method
from tokenreduce.registry import register_method
from tokenreduce.state import ReductionState

RSpec = int | list[int] | tuple[int, float]


@register_method
@dataclass
class ToMe(Method):
    """Merge ``r`` tokens per block by bipartite soft matching on the attention keys.

    ``r`` is an int (the same in every block), a per-block list, or ``(r, inflection)`` with
    ``inflection`` in [-1, 1] for a linearly increasing (> 0) or decreasing (< 0) schedule with the
    same total, as in the paper's code. Paper defaults: ``prop_attn=True``; ViT-S/16 with r=16.
    """

    name = "tome"
    paper = "Bolya et al., Token Merging: Your ViT But Faster, ICLR 2023"

    r: RSpec = 16
    prop_attn: bool = True  # weight attention by log(token size), the paper's proportional attention
    clip: bool = False  # lower r where it exceeds half the tokens instead of raising

    def __post_init__(self) -> None:
        r = self.r
        if isinstance(r, tuple):
            if len(r) != 2 or not _is_count(r[0]) or not isinstance(r[1], (int, float)) or not -1 <= r[1] <= 1:
                raise ValueError(f"r as a tuple must be (r >= 0, inflection in [-1, 1]), got {r!r}")
        elif isinstance(r, list):
            if not all(_is_count(v) for v in r):
                raise ValueError(f"r as a list must hold one integer >= 0 per block, got {r!r}")
        elif not _is_count(r):
            raise ValueError(f"r must be an integer >= 0, a per-block list or (r, inflection), got {r!r}")

    def per_layer_r(self, depth: int) -> list[int]:
        r = self.r
        if isinstance(r, list):
            if len(r) != depth:
                raise ValueError(f"r as a list must have one entry per block ({depth}), got {len(r)}")
            return list(r)
        r, inflection = r if isinstance(r, tuple) else (r, 0.0)
        if depth == 1:
            return [r]
        lo = int(r * (1.0 - inflection))
        hi = 2 * r - lo
        step = (hi - lo) / (depth - 1)
        return [int(lo + step * i) for i in range(depth)]

    def schedule(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        n, out = num_tokens, []
        for layer, r in enumerate(self.per_layer_r(depth)):
            limit = (n - num_prefix) // 2
            if r > limit:
                if not self.clip:
                    raise ValueError(
                        f"r={r} at layer {layer} exceeds half of the {n - num_prefix} mergeable tokens "
                        f"there (allowed 0..{limit}); lower r or pass clip=True"
                    )
                r = limit
            n -= r
            out.append(n)
        return out

    def reduce(self, x: Tensor, ctx: LayerContext, state: ReductionState) -> Tensor:
        r = x.shape[1] - ctx.num_out
        if r == 0:
            return x
        match = bipartite_soft_matching(ctx.metric(), r, ctx.num_prefix)
        if state.source is not None:
            state.source = match.merge(state.source, mode="amax")
        x, state.size = merge_wavg(match, x, state.sizes(x))
        return x


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0
