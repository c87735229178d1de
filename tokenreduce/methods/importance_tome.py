"""Importance-based token merging (Wu et al., ICCV 2025): tomesd's merging, with the destinations drawn from
the tokens that classifier-free guidance changed most at the previous denoising step, and the unimportant
tokens merged first."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenreduce.core import Selection, bipartite_merge, index_only, pool_partition
from tokenreduce.methods.denoiser import DenoiserContext, DenoiserMethod, Part
from tokenreduce.methods.tomesd import ToMeSD, timestep_key
from tokenreduce.registry import register_method
from tokenreduce.validate import as_bool, as_int, as_real

# Cosine similarities lie in [-1, 1], so adding 4 to the scores of the unimportant sources ranks every one
# of them ahead of every important source while float32 keeps their own order (the reference's 1e5 rounds
# them to 1/128 in float32 and overflows float16).
UNIMPORTANT_FIRST = 4.0


def guidance_difference(outputs: list[Tensor], learned_sigma: bool, grid: tuple[int, int]) -> Tensor | None:
    """``|cond - uncond|`` averaged over channels, ``[B0, H, W]`` (a video's frames folded into ``B0``,
    image-major, as UNetMotionModel folds them), from the denoiser outputs of one step in call order:
    two outputs are split CFG's ``uncond, cond``; one output of even batch holds ``[uncond; cond]``
    halves (batched CFG); anything else carries no guidance signal (``None``). Outputs are ``[B, C, H,
    W]``, ``[B, C, F, H, W]`` or packed tokens ``[B, N, C]`` on ``grid``; with ``learned_sigma`` only
    the first half of the channels (the noise prediction, not the variance) counts."""
    if len(outputs) == 2 and outputs[0].shape == outputs[1].shape:
        uncond, cond = outputs
    elif len(outputs) == 1 and outputs[0].shape[0] % 2 == 0:
        uncond, cond = outputs[0].chunk(2)
    else:
        return None
    diff = (cond.float() - uncond.float()).abs()
    channel = -1 if diff.dim() == 3 else 1
    if learned_sigma:
        diff = diff.narrow(channel, 0, diff.shape[channel] // 2)
    diff = diff.mean(dim=channel)
    if channel == -1:
        return diff.view(-1, *grid)
    return diff.reshape(-1, *diff.shape[-2:])


@dataclass
class GuidanceMemory:
    """One generation's importance: the denoiser outputs of the step running now, and the map made
    from those of the step before (computed when the next step first asks for it, so the two calls
    of split CFG both see the same map)."""

    learned_sigma: bool
    step: int = -1  # the step of ``outputs``
    outputs: list[Tensor] = field(default_factory=list)
    grid: tuple[int, int] = (0, 0)  # the finest token grid of ``outputs``
    importance: Tensor | None = None  # [B0, H, W] from the last finished step
    pooled: dict[tuple[int, int], Tensor] = field(default_factory=dict)  # importance on each block grid, [B0, N]

    def observe(self, output: Tensor, step: int, grid: tuple[int, int]) -> None:
        if step != self.step:
            self._finish()
            self.step = step
        self.outputs.append(output.detach())
        self.grid = grid

    def on_grid(self, step: int, grid: tuple[int, int]) -> Tensor | None:
        """The importance ``[B0, rows * cols]`` of the tokens of a block grid at ``step``, area-interpolated
        from the previous step's map; ``None`` when that step gave none (or there was none)."""
        if self.step < step:
            self._finish()
        if self.importance is None:
            return None
        flat = self.pooled.get(grid)
        if flat is None:
            importance = self.importance
            if tuple(importance.shape[-2:]) != grid:
                importance = F.interpolate(importance[:, None], size=grid, mode="area")[:, 0]
            flat = self.pooled[grid] = importance.flatten(1)
        return flat

    def _finish(self) -> None:
        if self.outputs:
            self.importance = guidance_difference(self.outputs, self.learned_sigma, self.grid)
            self.outputs, self.pooled = [], {}


@register_method
@dataclass
class ImportanceToMe(DenoiserMethod):
    """Importance-based token merging, with the reference's Stable Diffusion 2 schedule as defaults.

    Importance: after every step, ``|eps_cond - eps_uncond|`` averaged over the output channels
    (:func:`guidance_difference`), used at the next step, area-interpolated to each block's grid.
    Batched CFG gives the two halves of one call (diffusers: ``[uncond; cond]``; the order does not
    matter), split CFG the two calls of one step in order. Steps are counted from timestep changes
    and a timestep going up starts a new generation (the engine's ``uses_steps``).

    Matching at a merge step (``matching_by_heat_map``), on ``N`` tokens with ``r = int(N * ratio)``:
    ``int(N * dst_ratio)`` destinations are drawn at random from the pool of the ``M = min(N,
    int((N - r) * pool_ratio))`` most important tokens, every other token is a source; each source
    goes to its most cosine-similar destination on the block's input hidden states, sources less
    important than the whole pool first, then by similarity; the ``r`` first merge by plain means.
    The partition comes from the map of one image and serves its cond and uncond rows alike.

    Schedule (``pipe_sd.py``): steps before ``prune_from`` are left alone (``None``: none are);
    from ``prune_from`` to ``merge_from`` the step prunes: the same ``r`` sources leave the wrapped
    sub-modules without being averaged into their destinations and take their destination's output
    after them (the reference's ``m_mode="none"``), on tomesd's random 2x2 cells as ``pipe_sd.py``
    does (with ``prune_importance``, on the importance partition once a map exists, as
    ``pipe_pixart.py`` does). From ``merge_from`` on the step merges on the importance partition.
    Where a step has no map (the first step, a call without CFG: an odd batch or a guidance-distilled
    model, more than two calls at one timestep) it merges (or prunes) on tomesd's random cells
    instead, at the same ratio up to the cells' cap of 0.75: the reference has no such case (its
    pipelines start merging at step 2 and need CFG).

    PixArt-alpha's reference settings: ``ratio=0.5, merge_from=4, pool_ratio=1.0, merge_crossattn=True,
    prune_importance=True, learned_sigma=True``; its matching on grid coordinates instead of hidden
    states (``original_tome=False``) is not implemented.

    Open choices and departures from the reference (commit 1fdf5e2), each a fix or a necessity:
    the destinations are a hash of ``seed``, the block and the timestep (the same places of the pool
    for every image) instead of ``torch.randperm`` per image on the global RNG, so cond and uncond,
    batched or split, and an image alone or in a batch draw alike, and the global RNG is untouched; the pool
    keeps the lower position among equal importances (the reference's argsort leaves ties unordered)
    and never holds fewer tokens than the destinations (the reference asserts); unimportant sources
    are ranked first by ``+4`` on scores computed in float32 instead of ``+1e5``; destinations follow the unmerged
    sources in position order (the reference: in draw order; no effect on the output); a map is
    area-interpolated to every grid it differs from (the reference's SD path only shrinks it). Not
    implemented: ``dst_mode`` other than ``"random"``, and the chunked score maximum the reference
    switches to above 9216 sources (the full score matrix is built, as tomesd here does). A batch of
    even size that is not ``[uncond; cond]`` (two images without guidance) still reads as CFG halves:
    use the method with classifier-free guidance.
    """

    ratio: float = 0.7  # share of each block's tokens merged (or pruned) away
    merge_from: int = 2  # first step that merges on importance
    prune_from: int | None = 0  # first step that prunes; None: the steps before merge_from run untouched
    dst_ratio: float = 0.25  # destinations per token (the reference's kk)
    pool_ratio: float = 1.4  # the important pool's size per token left after merging (pp)
    prune_importance: bool = False  # prune steps use the importance partition once it exists
    learned_sigma: bool = False  # the output's second half of channels is a variance (DiT, PixArt-alpha)
    max_downsample: int = 1
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    seed: int = 0

    name = "importance_tome"
    paper = "Importance-Based Token Merging for Efficient Image and Video Generation (Wu et al., ICCV 2025)"
    uses_steps = True

    def __post_init__(self) -> None:
        self.ratio = as_real("ratio", self.ratio, 0, 1, high_open=True)
        self.dst_ratio = as_real("dst_ratio", self.dst_ratio, 0, 1, low_open=True, high_open=True)
        self.pool_ratio = as_real("pool_ratio", self.pool_ratio, 0, low_open=True)
        most = min(1 - self.dst_ratio, 1 - self.dst_ratio / self.pool_ratio)
        if self.ratio > most:
            raise ValueError(
                f"ratio must be in [0, {most:g}] with dst_ratio={self.dst_ratio:g} and pool_ratio={self.pool_ratio:g} "
                f"(only the sources, 1 - dst_ratio of the tokens, can merge, and the important pool, pool_ratio times the "
                f"tokens left, must hold the destinations), got {self.ratio}"
            )
        self.merge_from = as_int("merge_from", self.merge_from, 0)
        if self.prune_from is not None:
            self.prune_from = as_int("prune_from", self.prune_from, 0)
            if self.prune_from > self.merge_from:
                raise ValueError(
                    f"prune_from must be None or an integer in [0, merge_from={self.merge_from}], got {self.prune_from}"
                )
        self.prune_importance = as_bool("prune_importance", self.prune_importance)
        self.learned_sigma = as_bool("learned_sigma", self.learned_sigma)
        self.seed = as_int("seed", self.seed, 0)
        # tomesd's random-cell merge: the steps without a map, the cell-based prune steps, and the
        # sub-modules and levels the method wraps (it checks max_downsample and the merge_* flags)
        self._cells = ToMeSD(
            self.ratio,
            self.max_downsample,
            merge_attn=self.merge_attn,
            merge_crossattn=self.merge_crossattn,
            merge_mlp=self.merge_mlp,
            clip=True,
            seed=self.seed,
        )
        self.max_downsample = self._cells.max_downsample

    def parts(self) -> frozenset[Part]:
        return self._cells.parts()

    def acts_at(self, level: int) -> bool:
        return self._cells.acts_at(level)

    def new_memory(self) -> GuidanceMemory:
        return GuidanceMemory(self.learned_sigma)

    def observe(self, output: Tensor, ctx: DenoiserContext) -> None:
        ctx.memory.observe(output, ctx.step, ctx.grid)

    def plan(self, x: Tensor, ctx: DenoiserContext) -> Selection | None:
        step = ctx.step
        first = self.merge_from if self.prune_from is None else self.prune_from
        if step is None or step < first:
            return None
        prune = step < self.merge_from
        importance = None
        if ctx.memory is not None and (self.prune_importance or not prune):
            importance = ctx.memory.on_grid(step, ctx.grid)
        if importance is None or x.shape[0] % importance.shape[0]:
            selection = self._cells.plan(x, ctx)
        else:
            selection = self._importance_merge(x, importance, ctx)
        return index_only(selection) if prune and selection is not None else selection

    def _importance_merge(self, x: Tensor, importance: Tensor, ctx: DenoiserContext) -> Selection | None:
        """``matching_by_heat_map`` on ``x [B, N, C]`` with the importance ``[B0, N]`` of ``B0`` images
        (``B`` a multiple of ``B0``: the rows of each CFG branch, in order)."""
        n = ctx.num_tokens
        k = int(n * self.dst_ratio)
        r = min(int(n * self.ratio), n - k)
        if r == 0 or k == 0:
            return None
        pool = max(k, min(n, int((n - r) * self.pool_ratio)))
        key = timestep_key(self.seed, ctx.block, ctx.timestep)
        copies = x.shape[0] // importance.shape[0]
        src, dst, below = (t.repeat(copies, 1) for t in pool_partition(importance, pool, k, key))
        with torch.no_grad():
            unit = x.detach().float()
            unit = unit / unit.norm(dim=-1, keepdim=True)
            c = unit.shape[-1]
            a = unit.gather(1, src[..., None].expand(-1, -1, c))
            b = unit.gather(1, dst[..., None].expand(-1, -1, c))
            scores = a @ b.transpose(1, 2) + UNIMPORTANT_FIRST * below[..., None]
        return bipartite_merge(scores, src, dst, r, n)
