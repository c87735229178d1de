"""``none``: the identity method, the baseline every comparison is made against."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from tokenreduce.core import Selection
from tokenreduce.methods.base import EncoderMethod, LayerContext
from tokenreduce.registry import register_method


@register_method
@dataclass
class NoReduction(EncoderMethod):
    """Keeps every token; the patched model computes exactly what the original does."""

    name = "none"

    def schedule(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        return [num_tokens] * depth

    def select(self, x: Tensor, ctx: LayerContext) -> Selection | None:
        return None
