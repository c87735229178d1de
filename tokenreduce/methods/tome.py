"""``tome``: Token Merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from tokenreduce.core import Selection, bipartite_soft_matching
from tokenreduce.methods.base import Budget, EncoderMethod, LayerContext
from tokenreduce.registry import register_method
from tokenreduce.validate import as_bool, as_int, as_real, as_sequence

RSpec = int | list[int] | tuple[int, float]

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
        if self.r is not None and self.keep_ratio is not None:
            raise ValueError(f"pass r or keep_ratio, not both (got r={self.r!r}, keep_ratio={self.keep_ratio!r})")
        if self.r is None:
            ratio = DEFAULT_KEEP_RATIO if self.keep_ratio is None else self.keep_ratio
            self.keep_ratio = as_real("keep_ratio", ratio, 0, 1, low_open=True)
        elif isinstance(self.r, tuple):
            if len(self.r) != 2:
                raise ValueError(f"r as a tuple must be (r >= 0, inflection in [-1, 1]), got {self.r!r}")
            self.r = (as_int("r[0]", self.r[0], 0), as_real("r[1] (inflection)", self.r[1], -1, 1))
        elif isinstance(self.r, (list, range)) or getattr(self.r, "ndim", 0) == 1:
            self.r = [as_int(f"r[{i}]", v, 0) for i, v in enumerate(as_sequence("r", self.r, "integers >= 0"))]
        else:
            self.r = as_int("r", self.r, 0)

    def per_layer_r(self, mergeable: int, depth: int) -> list[int]:
        """Tokens to merge in each of ``depth`` blocks for ``mergeable`` non-prefix input tokens."""
        if self.keep_ratio is not None:
            return [int(mergeable * (1 - self.keep_ratio) / depth)] * depth
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
