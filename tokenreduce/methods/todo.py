"""ToDo: Token Downsampling (Smith, Saxena and Saha, arXiv 2402.13573, IJCAI 2024 demo track): in the
self-attention of every block at the finest level, the keys and values come from the image tokens
resized to a grid ``downsample_factor`` times smaller on each axis; the queries stay full, so the
attention's output needs no unmerge."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from tokenreduce.core import RESIZE_MODES, Selection, grid_resize
from tokenreduce.methods.denoiser import DenoiserContext, DenoiserMethod
from tokenreduce.registry import register_method
from tokenreduce.validate import as_int


@register_method
@dataclass
class ToDo(DenoiserMethod):
    """ToDo with the reference's defaults (``ethansmith2000/ImprovedTokenMerge`` 81928e4,
    ``patch_attention_proc`` with ``merge_tokens="keys/values"``, ``merge_method="downsample"``).

    The keys and values of each acting block's self-attention are projected from its normed input
    tokens resized from the ``h x w`` grid to ``max(1, h // f) x max(1, w // f)`` as
    ``F.interpolate(mode=downsample_method)`` does (``"avg_pool"``: ``F.avg_pool2d`` with kernel and
    stride ``h // new_h`` by ``w // new_w``), exactly: the resize is a selection whose weights are read
    from the op itself (:func:`tokenreduce.core.resize.grid_resize`). ``f`` is ``downsample_factor`` at
    every level up to ``max_downsample`` (the finest, level 1, by default), ``downsample_factor_level_2``
    at level 2 when ``max_downsample`` is 1, and 1 (nothing) elsewhere; ``f = 1`` leaves the block alone.

    Choices and departures from the reference:

    - Levels come from the block's place in the UNet (as tomesd's ``max_downsample``), not from its
      channel width (the reference acts where the width is 320, level 2 where it is 640: SD 1.x/2.x
      only). So ToDo acts on DiT and PixArt blocks (all at level 1) and on any UNet's finest attention;
      on SDXL-like UNets, whose finest level has no attention, apply raises unless ``max_downsample``
      or ``downsample_factor_level_2`` reaches level 2 (the reference silently downsamples nothing there).
    - The grid of each block is the one its tokens really lie on (odd latents make ``ceil`` sizes after
      each downsampling), and the pool's kernel is chosen per axis: the reference takes the grid as
      ``floor`` of the latent size and the kernel from the rows alone, and fails on odd and some
      non-square sizes ("Incompatible shapes for attention inputs"). A grid side shorter than ``f``
      resizes to 1 (the reference asks ``F.interpolate`` for size 0).
    - Modes: ``"nearest"``, ``"nearest-exact"``, ``"bilinear"`` and ``"avg_pool"``, each a sparse
      selection (every token feeds at most one key, since each axis shrinks at least 2x).
      ``"max_pool"`` is left out: a per-channel maximum is not a linear map of the tokens, so it is no
      selection. ``"bicubic"`` and ``"area"`` are left out: their taps overlap, and the dense map
      would cost as much as the attention it saves.
    - The reference's timestep switch (``timestep_threshold_switch=0.2``: tomesd's similarity merge of
      the keys and values, ``ratio=0.5``, once ``t < 200``; ``timestep_threshold_stop``) is left out:
      it is another method, turned off (both thresholds 0) in the reference's demo ``app.py``, and it
      reads the timestep on the host (``args[1].item()``, a graph break). ToDo here downsamples at
      every step.
    """

    downsample_factor: int = 2  # keys/values grid shrunk this many times per axis (demo: 3 at 1536 px, 4 at 2048 px)
    downsample_method: str = "nearest-exact"  # one of RESIZE_MODES
    max_downsample: int = 1  # levels 1 .. max_downsample use downsample_factor (level 1 is the finest grid)
    downsample_factor_level_2: int = 1  # factor at level 2 when max_downsample is 1 (the reference's knob)

    name = "todo"
    paper = "ToDo: Token Downsampling for Efficient Generation of High-Resolution Images (Smith et al., 2024)"
    kv_only = True

    def __post_init__(self) -> None:
        self.downsample_factor = as_int("downsample_factor", self.downsample_factor, 1)
        if self.downsample_method not in RESIZE_MODES:
            raise ValueError(
                f"downsample_method must be one of {RESIZE_MODES}, got {self.downsample_method!r} (max_pool is not a "
                "linear map of the tokens; bicubic and area would need a dense map as costly as the attention)"
            )
        self.max_downsample = as_int("max_downsample", self.max_downsample, 1)
        self.downsample_factor_level_2 = as_int("downsample_factor_level_2", self.downsample_factor_level_2, 1)
        if self.max_downsample >= 2 and self.downsample_factor_level_2 != 1:
            raise ValueError(
                f"downsample_factor_level_2 must be 1 when max_downsample >= 2 (level 2 then uses downsample_factor), got "
                f"{self.downsample_factor_level_2} with max_downsample={self.max_downsample}"
            )

    def factor(self, level: int) -> int:
        """How many times the keys and values shrink per axis at a downsampling level."""
        if level <= self.max_downsample:
            return self.downsample_factor
        return self.downsample_factor_level_2 if level == 2 else 1

    def acts_at(self, level: int) -> bool:
        return level <= self.max_downsample or self.factor(level) > 1

    def plan(self, x: Tensor, ctx: DenoiserContext) -> Selection | None:
        f = self.factor(ctx.level)
        h, w = ctx.grid
        out = (max(1, h // f), max(1, w // f))
        if out == ctx.grid:
            return None
        return grid_resize(x.shape[0], ctx.grid, out, self.downsample_method, x.device)
