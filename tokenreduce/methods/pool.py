"""``pool``: average pooling of each image's visual tokens on their patch grid (a pre-LLM baseline)."""

from __future__ import annotations

from dataclasses import dataclass

from tokenreduce.core import Selection, grid_pool
from tokenreduce.methods.visual import VisualContext, VisualMethod
from tokenreduce.registry import register_method
from tokenreduce.validate import as_int


@register_method
@dataclass
class Pool(VisualMethod):
    """Average every ``stride x stride`` window of the projected tokens' patch grid (edges cut short).

    ``stride`` (default 2) fixes the output; ``keep_ratio`` / ``keep_tokens`` instead pick the smallest
    stride whose output fits the budget. Outputs are in row-major window order.
    """

    name = "pool"
    paper = "grid average-pooling baseline (e.g. VLMUniPruneBench's Pool)"
    default_keep_ratio = None

    stride: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stride is not None and (self.keep_ratio is not None or self.keep_tokens is not None):
            raise ValueError("pass stride or keep_ratio/keep_tokens, not both")
        if self.keep_ratio is None and self.keep_tokens is None:
            self.stride = as_int("stride", 2 if self.stride is None else self.stride, 1)

    def has_own_budget(self) -> bool:
        return self.stride is not None

    def _stride(self, num_tokens: int, grid: tuple[int, int]) -> int:
        if self.stride is not None:
            return self.stride
        budget = super().num_kept(num_tokens, grid)
        rows, cols = grid
        return next(s for s in range(1, max(rows, cols) + 1) if -(-rows // s) * -(-cols // s) <= budget)

    def num_kept(self, num_tokens: int, grid: tuple[int, int] | None) -> int:
        if grid is None:
            raise ValueError("pool needs the visual tokens' patch grid, which this model does not lay out")
        s = self._stride(num_tokens, grid)
        return -(-grid[0] // s) * -(-grid[1] // s)

    def select(self, ctx: VisualContext) -> Selection:
        if ctx.grid is None:
            raise ValueError("pool needs the visual tokens' patch grid, which this model does not lay out")
        m, n = ctx.features.shape[:2]
        return grid_pool(m, ctx.grid, self._stride(n, ctx.grid), ctx.features.device)
