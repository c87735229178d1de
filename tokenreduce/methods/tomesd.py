"""ToMe for Stable Diffusion (Bolya and Hoffman, 2023): in every block whose grid is downsampled at most
``max_downsample`` times, merge ``ratio`` of the image tokens into one destination per ``sy x sx`` cell
before self-attention and copy the merged outputs back after it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokenreduce.core import Selection, best_match, bipartite_merge, cell_partition, corner_partition, random_cell_choice
from tokenreduce.methods.denoiser import DenoiserContext, DenoiserMethod, Part
from tokenreduce.registry import register_method
from tokenreduce.validate import as_cell_ratio, as_int


def timestep_key(seed: int, block: int, timestep: Tensor | None) -> int | Tensor:
    """A hash key from the seed, the block and the timestep value, computed without leaving the graph:
    every call at one timestep (cond and uncond, batched or split) draws the same, every step anew."""
    key = seed * 1_000_003 + block * 7919
    if timestep is None:
        return key
    return key + (timestep.detach().flatten()[0].to(torch.float64) * 1_000_003).round().long()


@register_method
@dataclass
class ToMeSD(DenoiserMethod):
    """tomesd with its defaults (``tomesd.apply_patch``).

    Destinations: one per whole ``sy x sx`` cell, at a random place in the cell with ``use_rand`` (else
    the top-left); every other token, a ragged border included, is a source. Each source is matched to
    its most cosine-similar destination on the block's input hidden states; the ``int(N * ratio)``
    best-matched sources merge into their destinations by plain means; the sub-modules in ``parts``
    (self-attention by default) run on the rest and every source takes its destination's output.

    Departures from tomesd 0.1.3, each a fix for its users: the random destinations come from a hash
    of ``seed``, the block and the timestep instead of a generator forked from the global RNG, so cond
    and uncond calls share destinations whether batched or split (tomesd turns randomness off for odd
    batches), nothing consumes the global RNG, and ``torch.compile`` traces it; a ``ratio`` above the
    cap ``1 - 1 / (sx * sy)`` (0.75 by default) raises instead of being capped, unless ``clip``; the
    grid of a DiT or FLUX comes from its patch size or position ids, not the latent size (tomesd saw
    downsample 2 there and merged nothing). With ``use_rand=False`` the merges equal tomesd's.
    """

    ratio: float = 0.5
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    clip: bool = False  # cap ratio at what the cells allow instead of raising
    seed: int = 0

    name = "tomesd"
    paper = "Token Merging for Fast Stable Diffusion (Bolya and Hoffman, CVPRW 2023)"

    def __post_init__(self) -> None:
        self.sx = as_int("sx", self.sx, 1)
        self.sy = as_int("sy", self.sy, 1)
        self.ratio = as_cell_ratio("ratio", self.ratio, self.sx, self.sy, self.clip, "merge")
        self.max_downsample = as_int("max_downsample", self.max_downsample, 1)
        self.seed = as_int("seed", self.seed, 0)
        if not (self.merge_attn or self.merge_crossattn or self.merge_mlp):
            raise ValueError("at least one of merge_attn, merge_crossattn, merge_mlp must be True")

    def parts(self) -> frozenset[Part]:
        chosen = {Part.ATTN: self.merge_attn, Part.CROSS_ATTN: self.merge_crossattn, Part.MLP: self.merge_mlp}
        return frozenset(part for part, on in chosen.items() if on)

    def acts_at(self, level: int) -> bool:
        return level <= self.max_downsample

    def plan(self, x: Tensor, ctx: DenoiserContext) -> Selection | None:
        n = ctx.num_tokens
        cells = (ctx.grid[0] // self.sy, ctx.grid[1] // self.sx)
        if cells[0] * cells[1] == 0:  # a grid smaller than one cell has no destination to merge into
            return None
        if self.use_rand:
            choice = random_cell_choice(cells, self.sx * self.sy, timestep_key(self.seed, ctx.block, ctx.timestep), x.device)
            src, dst = cell_partition(ctx.grid, self.sx, self.sy, choice)
        else:  # the same partition for every call at this grid
            src, dst = corner_partition(ctx.grid, self.sx, self.sy, x.device)
        r = min(int(n * self.ratio), src.numel())
        if r == 0:
            return None
        unit = x / x.norm(dim=-1, keepdim=True)
        best = best_match(unit.index_select(1, src), unit.index_select(1, dst))
        b = x.shape[0]
        return bipartite_merge(None, src.expand(b, -1), dst.expand(b, -1), r, n, best=best)
