"""SiTo (Zhang, Tang, Ning and Zhang, "Training-Free and Hardware-Friendly Acceleration for Diffusion Models
via Similarity-based Token Pruning", AAAI 2025): in every block whose grid is downsampled at most
``max_downsample`` times, the most representative token of each ``sy x sx`` cell is a base token, the
``ratio`` of the image tokens most similar to a base token are pruned before self-attention, and each
pruned token takes the output of its most similar base token after it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokenreduce.core import (
    Selection,
    bipartite_merge,
    cell_argmax,
    cell_partition,
    hash_normal,
    merge_into_nearest,
    top_k_positions,
)
from tokenreduce.methods.denoiser import DenoiserContext, DenoiserMethod, Part
from tokenreduce.methods.tomesd import timestep_key
from tokenreduce.registry import register_method
from tokenreduce.validate import as_cell_ratio, as_int, as_real

RECOVERY = ("base", "nearest")


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """``x [B, N, C]`` at ``index [B, M]``: ``[B, M, C]``."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


@register_method
@dataclass
class SiTo(DenoiserMethod):
    """SiTo with the reference's defaults (``sito.apply_patch``; reference ``EvelynZhang-epiclab/SiTo``
    ``sito.py`` and ``patch.py``, read at commit 2d5ab30, no licence: re-implemented, nothing copied).

    On the block's input hidden states (as the reference), with cosine similarities ``cos``:

    1. Base tokens: in each whole ``sy x sx`` cell, the token with the highest ``sim_beta * sum_j cos(x_i,
       x_j) + noise_alpha * N(0, 1)``; every other token, a ragged border included, is a candidate.
    2. Pruned tokens: the ``int(N * ratio)`` candidates whose most similar base token (over all cells) is
       most similar.
    3. The sub-modules in ``parts`` (self-attention by default) run on the kept tokens only (a gather: no
       averaging); each pruned token takes a kept token's output: its most similar base token with
       ``recover="base"`` (the paper, its figure and the README), its most similar kept token, base or
       candidate, with ``recover="nearest"`` (what ``sito.py`` computes).

    Arguments of ``sito.apply_patch``: ``prune_ratio`` -> ``ratio``, ``max_downsample_ratio`` ->
    ``max_downsample``, ``prune_selfattn_flag`` / ``prune_crossattn_flag`` / ``prune_mlp_flag`` ->
    ``prune_attn`` / ``prune_crossattn`` / ``prune_mlp``; ``sx``, ``sy``, ``noise_alpha`` and ``sim_beta``
    keep their names.

    Open choices, settled here: the default recovery follows the paper, which ``sito.py`` departs from
    (``recover="nearest"`` reproduces it); ties go to the first token in a cell and, among candidates, in
    no fixed order (as the reference's unstable sort); a grid with no whole cell, or a ``ratio`` pruning
    nothing, leaves the block alone.

    Departures from the reference, each a fix for its users:

    - The noise is a counter-based hash of ``seed``, the block and the timestep (:func:`hash_normal`), one
      value per token shared by the batch, instead of ``torch.randn(B, N)`` from the global generator: cond
      and uncond calls, batched or split, see the same noise, an image's tokens do not depend on its batch
      neighbours, nothing consumes the global RNG, and ``torch.compile`` traces it (0 graph breaks).
    - The similarity sums are ``u_i . sum_j u_j`` over the unit vectors ``u``, the same sums as the
      reference's full ``N x N`` cosine matrix (32 MiB per image at 512 px in its float16) in ``O(N C)``;
      what is left is tomesd's candidates-by-base matrix. Scores are float32, not float16 (CPU support, and
      sums over 4096 tokens).
    - Any grid: non-square and odd grids (the reference assumes ``sqrt(N)`` squares), and no module-level
      CUDA tensor (the reference fails to import without CUDA).
    - A ``ratio`` above the cap ``1 - 1 / (sx * sy)`` raises (the reference fails on a shape mismatch)
      unless ``clip``: then at most every candidate is pruned.
    - Beyond the reference's SD UNets: DiT, PixArt, SD3 and FLUX blocks through the denoiser engine, on the
      grid of their patch size or position ids.
    """

    ratio: float = 0.5  # share of the block's image tokens pruned (prune_ratio)
    max_downsample: int = 1  # blocks whose grid is downsampled at most this much (max_downsample_ratio)
    sx: int = 2  # cell width
    sy: int = 2  # cell height
    noise_alpha: float = 0.1  # weight of the Gaussian noise in the base-token score
    sim_beta: float = 1.0  # weight of the summed similarity in the base-token score
    recover: str = "base"  # a pruned token takes the output of its most similar "base" or "nearest" kept token
    prune_attn: bool = True
    prune_crossattn: bool = False
    prune_mlp: bool = False
    clip: bool = False  # cap ratio at what the cells allow instead of raising
    seed: int = 0

    name = "sito"
    paper = (
        "Training-Free and Hardware-Friendly Acceleration for Diffusion Models via Similarity-based Token Pruning "
        "(Zhang et al., AAAI 2025)"
    )

    def __post_init__(self) -> None:
        self.sx = as_int("sx", self.sx, 1)
        self.sy = as_int("sy", self.sy, 1)
        self.ratio = as_cell_ratio("ratio", self.ratio, self.sx, self.sy, self.clip, "prune")
        self.max_downsample = as_int("max_downsample", self.max_downsample, 1)
        self.noise_alpha = as_real("noise_alpha", self.noise_alpha, 0)
        self.sim_beta = as_real("sim_beta", self.sim_beta, 0)
        if self.recover not in RECOVERY:
            raise ValueError(f"recover must be one of {RECOVERY}, got {self.recover!r}")
        self.seed = as_int("seed", self.seed, 0)
        if not (self.prune_attn or self.prune_crossattn or self.prune_mlp):
            raise ValueError("at least one of prune_attn, prune_crossattn, prune_mlp must be True")

    def parts(self) -> frozenset[Part]:
        chosen = {Part.ATTN: self.prune_attn, Part.CROSS_ATTN: self.prune_crossattn, Part.MLP: self.prune_mlp}
        return frozenset(part for part, on in chosen.items() if on)

    def acts_at(self, level: int) -> bool:
        return level <= self.max_downsample

    def plan(self, x: Tensor, ctx: DenoiserContext) -> Selection | None:
        n = ctx.num_tokens
        r = int(n * self.ratio)
        if r == 0 or ctx.grid[0] < self.sy or ctx.grid[1] < self.sx:
            return None
        with torch.no_grad():
            unit = x.detach().float()
            unit = unit / unit.norm(dim=-1, keepdim=True)
            score = self.sim_beta * (unit @ unit.sum(dim=1)[..., None])[..., 0]  # [B, N]: sum_j cos(x_i, x_j)
            if self.noise_alpha:
                key = timestep_key(self.seed, ctx.block, ctx.timestep)
                score = score + self.noise_alpha * hash_normal(n, key, x.device)
            src, dst = cell_partition(ctx.grid, self.sx, self.sy, cell_argmax(score, ctx.grid, self.sx, self.sy))
            r = min(r, src.shape[1])
            scores = _rows(unit, src) @ _rows(unit, dst).transpose(1, 2)
            base = self.recover == "base"
            selection = bipartite_merge(scores, src, dst, r, n, drop_sources=True, copy_back=base)
            if base:
                return selection
            pruned = top_k_positions((selection.slot < 0).float(), r)
            slot, _ = merge_into_nearest(unit, selection.index, pruned, n)
            return Selection(slot, selection.index, gather_only=True)
