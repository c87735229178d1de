"""``token_transforming``: Token Transforming (Zeng, Yu, Kong, Tang, "Token Transforming: A Unified and
Training-Free Token Compression Framework for Vision Transformer Acceleration", arXiv 2506.05709, 2025;
workshop version "M2M-TAG: Training-Free Many-to-Many Token Aggregation for Vision Transformer
Acceleration", NeurIPS 2024 Workshop on Machine Learning and Compression)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from tokenreduce.core import Selection, transform_to_targets
from tokenreduce.methods.base import Budget, EncoderMethod, LayerContext
from tokenreduce.registry import register_method
from tokenreduce.validate import as_bool, as_int, as_real

# r=13 per block on DeiT-S (196 patches, 12 blocks): 197 -> 41 tokens, 2.70 GMACs, -41%.
DEFAULT_KEEP_RATIO = 0.2


@register_method
@dataclass
class TokenTransforming(EncoderMethod):
    """Reduce ``r`` tokens per block by a many-to-many transformation ``X' = T X`` onto the most
    important tokens.

    The paper (abstract) writes token reduction "as an explicit form of token matrix transformation, in
    which all existing methods are constructing special forms of matrices" (the method specification's
    summary: pruning has one-hot rows of ``T``, merging averaging rows) and proposes "a many-to-many Token
    Transforming framework that serves as a generalization of all existing methods and reserves the
    most information, even enabling training-free acceleration", reporting "40% FLOPs" less on DeiT-S,
    "x1.5" faster at "0.1% accuracy drop", and use on dense prediction (segmentation, detection, depth).
    The official repository (``AuroraZengfh/TokenTransforming``) holds only a README, and the paper's
    method section could not be retrieved: how ``T`` is built below is our construction within that
    framework, every step a choice the available text leaves open. In each block, at ``N`` tokens of
    which ``P`` are prefix tokens, leaving ``N - r``:

    1. Targets (the rows of ``T``): the ``N - r - P`` non-prefix tokens the class token attends to most
       (head-averaged softmax row, computed beside SDPA); on towers without a class token, the attention
       each token receives, averaged over heads and queries (the full map of that block, recomputed).
    2. Many-to-many assignment: every other token is sent to its ``spread`` most similar targets (cosine
       of the attention keys averaged over heads, ToMe's metric), with weights ``softmax(similarity /
       temperature)`` over those targets; a target is sent wholly to itself, prefix tokens stay as they
       are. ``spread=1`` is hard nearest-target merging (many-to-one).
    3. ``T``: each output is the size-weighted mean of everything sent to it (rows of ``T`` sum to 1:
       merging's averaging rows, generalised); sizes follow the assignment, so their total is kept.
    4. Dense outputs (:meth:`tokenreduce.Record.restore`): token ``i`` is rebuilt as the weighted sum of
       the outputs it was sent to, by its assignment weights (our inverse of ``T``).

    Schedule (ours, as ToMe's): hook after the attention residual, before the MLP, in every block, with
    the same ``r`` in every block; ``r`` is an int, or ``keep_ratio`` gives ``r = floor(M (1 - keep_ratio)
    / depth)`` for ``M`` non-prefix input tokens. Default ``keep_ratio=0.2``: r=13 on DeiT-S, 2.70
    GMACs, -41%, the nearest constant-r schedule to the paper's "40% FLOPs" (r=12 gives -38%).
    ``prop_attn=True`` (proportional attention, ToMe's off-the-shelf setting) because outputs are means
    of several tokens; the paper's choice is unknown. ``spread=3`` and ``temperature=0.1`` are ours.
    """

    name = "token_transforming"
    budget = Budget("keep_ratio", 0.0, 1.0)
    paper = (
        "Zeng et al., Token Transforming: A Unified and Training-Free Token Compression Framework "
        "for Vision Transformer Acceleration, arXiv 2506.05709, 2025"
    )

    r: int | None = None  # tokens removed per block
    keep_ratio: float | None = None  # fraction of the non-prefix tokens left after the last block
    spread: int = 3  # targets each other token is sent to
    temperature: float = 0.1  # of the softmax over its similarities to those targets
    prop_attn: bool = True  # weight attention by log(token size)

    def __post_init__(self) -> None:
        if self.r is not None and self.keep_ratio is not None:
            raise ValueError(f"pass r or keep_ratio, not both (got r={self.r!r}, keep_ratio={self.keep_ratio!r})")
        if self.r is None:
            ratio = DEFAULT_KEEP_RATIO if self.keep_ratio is None else self.keep_ratio
            self.keep_ratio = as_real("keep_ratio", ratio, 0, 1, low_open=True)
        else:
            self.r = as_int("r", self.r, 0)
        self.spread = as_int("spread", self.spread, 1)
        self.temperature = as_real("temperature", self.temperature, 0, None, low_open=True)
        self.prop_attn = as_bool("prop_attn", self.prop_attn)

    def per_block(self, num_tokens: int, num_prefix: int, depth: int) -> int:
        """Tokens removed in each block."""
        mergeable = num_tokens - num_prefix
        if self.r is None:
            return int(mergeable * (1 - self.keep_ratio) / depth)
        if self.r * depth > mergeable - 1:
            raise ValueError(
                f"r={self.r} over {depth} blocks removes more than the {mergeable} non-prefix tokens allow "
                f"(one must remain); r must be in [0, {(mergeable - 1) // depth}] for this input"
            )
        return self.r

    def schedule(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        r = self.per_block(num_tokens, num_prefix, depth)
        out = [num_tokens - r * (i + 1) for i in range(depth)]
        last = out[-1] - num_prefix if r else None
        if last is not None and self.spread > last:
            raise ValueError(f"spread={self.spread} exceeds the {last} targets of the last block; spread must be in [1, {last}]")
        return out

    def select(self, x: Tensor, ctx: LayerContext) -> Selection | None:
        n, p = x.shape[1], ctx.num_prefix
        if ctx.num_out == n:
            return None
        importance = ctx.cls_attention()[:, p:] if p else ctx.received()
        return transform_to_targets(ctx.metric(), importance, ctx.num_out - p, p, self.spread, self.temperature, ctx.size)
