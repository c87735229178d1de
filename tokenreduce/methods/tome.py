"""``tome``: Token Merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from tokenreduce.core import Selection, bipartite_soft_matching
from tokenreduce.methods.base import Budget, EncoderMethod, LayerContext
from tokenreduce.methods.rschedule import RSpec, check_r, per_layer_r
from tokenreduce.registry import register_method
from tokenreduce.validate import as_bool

# r=13 on a 197-token, 12-block ViT-S/B (the paper's headline setting) keeps 40 of 196 patch tokens.
DEFAULT_KEEP_RATIO = 0.2


@register_method
@dataclass
class ToMe(EncoderMethod):
    """Merge ``r`` tokens per block by bipartite soft matching on the attention keys.

    Give either ``r`` or ``keep_ratio``. ``r`` is an int (the same in every block), a per-block list,
    or ``(r, inflection)`` with ``inflection`` in [-1, 1] for a linearly increasing (> 0) or decreasing
    (< 0) schedule with the same total, as in the paper's code. ``keep_ratio`` is the resolution- and
    depth-independent form: the same r in every block, ``floor(M * (1 - keep_ratio) / depth)`` for
    ``M`` mergeable input tokens, so that at least ``keep_ratio`` of them remain after the last block.
    With neither, ``keep_ratio=0.2`` (r=13 on ViT-S/B at 224 px, the paper's setting). Paper defaults:
    ``prop_attn=True``.
    """

    name = "tome"
    paper = "Bolya et al., Token Merging: Your ViT But Faster, ICLR 2023"
    budget = Budget("keep_ratio", 0.0, 1.0)

    r: RSpec | None = None
    keep_ratio: float | None = None  # fraction of the mergeable tokens left after the last block
    prop_attn: bool = True  # weight attention by log(token size), the paper's proportional attention
    clip: bool = False  # lower r where it exceeds half the tokens instead of raising

    def __post_init__(self) -> None:
        self.prop_attn = as_bool("prop_attn", self.prop_attn)
        self.clip = as_bool("clip", self.clip)
        self.r, self.keep_ratio = check_r(self.r, self.keep_ratio, DEFAULT_KEEP_RATIO)

    def per_layer_r(self, mergeable: int, depth: int) -> list[int]:
        """Tokens to merge in each of ``depth`` blocks for ``mergeable`` non-prefix input tokens."""
        return per_layer_r(self.r, self.keep_ratio, mergeable, depth)

    def schedule(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        mergeable = num_tokens - num_prefix
        n, out = num_tokens, []
        for layer, r in enumerate(self.per_layer_r(mergeable, depth)):
            limit = (n - num_prefix) // 2
            if r > limit:
                if self.keep_ratio is not None:
                    # A constant r fits iff (depth + 1) * r <= mergeable (the last block merges at most half
                    # of what is left), and r = floor(mergeable * (1 - keep_ratio) / depth).
                    lowest = 1 - (mergeable // (depth + 1) + 1) * depth / mergeable
                    raise ValueError(
                        f"keep_ratio={self.keep_ratio} needs r={r} merges per block, more than the last of the {depth} "
                        f"blocks can make with {mergeable} mergeable input tokens; keep_ratio must be in "
                        f"({lowest:.6g}, 1] for this input"
                    )
                if not self.clip:
                    raise ValueError(
                        f"r={r} at layer {layer} exceeds half of the {n - num_prefix} mergeable tokens "
                        f"there (allowed 0..{limit}); lower r or pass clip=True"
                    )
                r = limit
            n -= r
            out.append(n)
        return out

    def select(self, x: Tensor, ctx: LayerContext) -> Selection | None:
        r = x.shape[1] - ctx.num_out
        if r == 0:
            return None
        return bipartite_soft_matching(ctx.metric(), r, ctx.num_prefix, ctx.size)
