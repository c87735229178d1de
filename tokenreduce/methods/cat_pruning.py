"""CAT Pruning (Cheng, Chen and Jia, "CAT Pruning: Cluster-Aware Token Pruning For Text-to-Image
Diffusion Models", arXiv 2502.00433, 2025): after a few full steps, every block of a DiT recomputes only
a share of the image tokens per step, chosen from how the predicted noise changed, where its clusters
lie and how long ago each token was last recomputed; the other tokens reuse their outputs of the step
before."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from tokenreduce.core import grid_edges, label_adjacency, patch_where, patchify, strided_targets, weighted_kmeans
from tokenreduce.methods.denoiser import DenoiserContext, DenoiserMethod, Part, Recompute
from tokenreduce.registry import register_method
from tokenreduce.validate import as_bool, as_int, as_real


@dataclass
class CatMemory:
    """One generation's state in the calling thread, across the denoiser calls of its steps. An
    *image* is a latent of the batch: the CFG copies of one latent (two halves of a batch, or two
    split calls) are one image, with one choice of tokens."""

    step: int = -1  # the running step
    calls: int = 0  # calls of the running step seen so far
    first_input: Tensor | None = None  # [B, N, C] the first block's input in the step's first call
    images: list[Tensor] = field(default_factory=list)  # per call of the step: each row's image [B]
    rows: list[Tensor | None] = field(default_factory=list)  # per call: the tokens it recomputes [B, n]
    fresh: list[Tensor] = field(default_factory=list)  # per call: its output per token [B, N, D], as computed
    final: list[Tensor] = field(default_factory=list)  # per call: its output as returned
    previous: list[Tensor] = field(default_factory=list)  # the finals of the step before
    reference: Tensor | None = None  # [I, N, D] each image's noise at step stop_idx + 1
    labels: Tensor | None = None  # [I, N] each image's clusters
    counts: Tensor | None = None  # [I, N] staleness: recomputations, halved every step
    chosen: Tensor | None = None  # [I, n] the tokens recomputed at the running step, ascending
    caches: dict[tuple[int, int], dict] = field(default_factory=dict)  # (call, block) -> its Recompute cache


@register_method
@dataclass
class CatPruning(DenoiserMethod):
    """CAT Pruning with the defaults of the reference (``ada-cheng/CAT-Pruning``, ``qcache/``, commit
    3b88889; no licence: re-implemented from reading it).

    Steps are counted from 0. Steps ``0 .. stop_idx + 2`` run in full (the paper's ``t0 = stop_idx + 3``,
    8 by default); the guiding noise of step ``stop_idx + 1`` is the reference ``v0``; after step
    ``stop_idx + 2`` each image's tokens are clustered by K-Means (``clusters``) on ``0.05 * v + pos``
    (``pos``: the token's row / rows in the first half of the features, column / cols in the second),
    once. Every later step recomputes ``int(select_factor * N)`` tokens per image, chosen after the step
    before from ``delta = v - v0`` (``v`` that step's noise as computed, before reuse):

    - the first choice: each cluster's value is the channel-wise max of ``delta`` over its tokens,
      then ``2 * mean + max`` of that over the cluster and the clusters it touches on the 4-neighbour
      grid; clusters by descending norm of the value each give their ``budget // 10`` tokens of largest
      ``|delta|`` until more than the budget are taken; the first ``budget`` are kept;
    - every later choice: staleness counts are halved and the last step's tokens add 1; clusters rank
      by the norm of their channel-wise max of ``delta``; the cluster of rank ``i`` gives its
      ``min(size, int(budget // 5 * 0.25))`` tokens of largest ``|delta|`` (three, two times as many at
      ranks 0 and 1), clusters after the first also their ``int(that * 0.5)`` stalest, until more than a
      quarter of the budget are taken; the first ``int(0.25 * budget)`` of those join the
      ``int(0.75 * budget)`` stalest tokens of the image.

    A recomputed block runs its self-attention for the chosen tokens' queries against the keys and
    values of all tokens (the chosen ones fresh, written into the cached ones), the text fully, its
    cross-attention and MLP on the chosen tokens; the others take the sub-modules' outputs of the step
    before, under the gates and norms of this step; the denoiser's output of every unchosen token (its
    patch of the latent) is its output of the step before.

    Choices the reference leaves open and departures from it:

    - Images: the reference chooses once for the whole batch from row ``[1]`` (the conditional half of a
      single prompt; an unconditional row for more prompts). Here each image has its own clusters,
      counts and tokens, and rows whose first block inputs are equal are copies of one image (the halves
      of a batched CFG call, or a split call repeating the step's first one): they share the choice,
      made from the later copy's noise (the conditional one in the ``[uncond, cond]`` order of the SD3
      and PixArt pipelines; ``cond_first`` for DiTPipeline's ``[cond, uncond]``). Rows of a
      guidance-distilled call each guide themselves; two rows given equal latents count as one image.
    - Steps are counted from timestep values, not calls, so split CFG and second-order samplers count
      right; caches are kept per call of a step (one per split CFG branch) and block, and a second
      generation (the timestep going up) starts afresh.
    - Every step recomputes exactly the budget: the union is topped up with the stalest tokens not yet
      chosen (as the reference's compiled pipeline ``qcache_compile`` does; its top-up may repeat a
      token), so a batch's rows stack and ``select_factor=1`` recomputes every token.
    - Staleness counts start as the first recomputed step's tokens and then halve each step (as
      ``qcache_compile``); ``qcache``'s extra reset while no cluster has been chosen twice is left out.
    - Ties: ``|delta|`` orders descending with ties to the lower position; staleness orders by lowest
      count, ties to the larger ``|delta|``, then the lower position; clusters rank by descending
      value, ties to the lower cluster (the reference's ``topk`` leaves ties to the device).
    - K-Means: the project's :func:`~tokenreduce.core.weighted_kmeans` (``kmeans_iterations`` Lloyd
      rounds from ``clusters`` evenly spaced tokens, each seed kept in its cluster), deterministic,
      instead of scikit-learn's k-means++ (``random_state=0``, up to 300 rounds) on the CPU: the
      clusters differ from scikit-learn's. The grid pooling is torch_geometric's ``max_pool`` and
      ``SimpleConv`` (mean, mean, max summed, self loops) written out, on any grid (the reference fixes
      4096 tokens on a 64x64 grid).
    - The reference's ``QCacheConfig`` builds on CUDA only; this runs on any device. Outputs reused
      across steps are detached: no gradient flows into earlier steps.
    - Models: SD3 (``JointTransformerBlock``; SD3.5's image-only ``attn2`` as a self-attention, where
      the reference would call it as a joint one), and DiT and PixArt (``BasicTransformerBlock``), which
      the paper reports and the reference code does not cover; UNets and FLUX raise at apply.
    """

    select_factor: float = 0.3  # share of the image tokens recomputed in each pruned step
    stop_idx: int = 5  # steps 0 .. stop_idx + 2 run in full
    clusters: int = 20  # K-Means clusters of the noise (at most the token count)
    kmeans_iterations: int = 30  # Lloyd rounds (the reference: scikit-learn's, up to 300)
    cond_first: bool = False  # the conditional copy of a latent comes first (DiTPipeline)

    name = "cat_pruning"
    paper = "CAT Pruning: Cluster-Aware Token Pruning For Text-to-Image Diffusion Models (Cheng et al., 2025)"
    uses_steps = True
    recomputes = True

    def __post_init__(self) -> None:
        self.select_factor = as_real("select_factor", self.select_factor, 0, 1, low_open=True)
        self.stop_idx = as_int("stop_idx", self.stop_idx, 0)
        self.clusters = as_int("clusters", self.clusters, 1)
        self.kmeans_iterations = as_int("kmeans_iterations", self.kmeans_iterations, 1)
        self.cond_first = as_bool("cond_first", self.cond_first)

    def parts(self) -> frozenset[Part]:
        return frozenset({Part.ATTN, Part.CROSS_ATTN, Part.MLP})

    def new_memory(self) -> CatMemory:
        return CatMemory()

    def plan(self, x: Tensor, ctx: DenoiserContext) -> Recompute | None:
        mem: CatMemory = ctx.memory
        if ctx.step != mem.step:
            self._start_step(mem, ctx.step, ctx.grid)
        call = mem.calls
        if call == len(mem.images):  # the call's first block
            mem.images.append(self._image_ids(x, mem))
            mem.rows.append(None if mem.chosen is None else mem.chosen[mem.images[call]])
        if ctx.step < self.stop_idx + 2:
            return None
        return Recompute(mem.rows[call], mem.caches.setdefault((call, ctx.block), {}))

    def observe(self, output: Tensor, ctx: DenoiserContext) -> Tensor | None:
        mem: CatMemory = ctx.memory
        call = mem.calls
        mem.calls += 1
        if ctx.step < self.stop_idx + 1:
            return None
        # one row per token, each patch in (y, x, channel) order: the rows of the DiT's proj_out
        mem.fresh.append(patchify(output, _patch_size(output, ctx.grid), channels_last=True).detach().float())
        rows = mem.rows[call] if call < len(mem.rows) else None
        final = output
        if rows is not None:
            if call >= len(mem.previous) or mem.previous[call].shape != output.shape:
                raise RuntimeError(
                    f"cat_pruning: call {call} of step {ctx.step} has no output of the step before to reuse: the calls "
                    "of one generation must keep their number and batch"
                )
            computed = torch.zeros(rows.shape[0], ctx.num_tokens, dtype=torch.bool, device=rows.device).scatter(1, rows, True)
            final = patch_where(computed, output, mem.previous[call], _patch_size(output, ctx.grid))
        mem.final.append(final.detach())
        return None if final is output else final

    def _start_step(self, mem: CatMemory, step: int, grid: tuple[int, int]) -> None:
        """Choose this step's tokens from the outputs of the step that ended, then open this one."""
        if mem.fresh:
            noise = self._guides(mem)
            if step == self.stop_idx + 2:
                mem.reference = noise
            elif mem.reference is not None:
                if noise.shape != mem.reference.shape:
                    raise RuntimeError(
                        f"cat_pruning: step {step - 1} held {noise.shape[0]} images of {noise.shape[1]} tokens, the "
                        f"generation started with {mem.reference.shape[0]} of {mem.reference.shape[1]}"
                    )
                self._choose(mem, noise, grid)
        mem.step, mem.calls, mem.first_input = step, 0, None
        mem.previous, mem.final, mem.fresh, mem.images, mem.rows = mem.final, [], [], [], []

    def _choose(self, mem: CatMemory, noise: Tensor, grid: tuple[int, int]) -> None:
        images, n = noise.shape[:2]
        budget = max(1, int(self.select_factor * n))
        k = min(self.clusters, n)
        delta = noise - mem.reference
        if mem.labels is None:
            mem.labels = self._cluster(noise, grid, k)
            touching = label_adjacency(mem.labels, grid_edges(*grid, device=noise.device), k)
            mem.chosen = torch.stack([_first_choice(delta[i], mem.labels[i], touching[i], budget) for i in range(images)])
            return
        recomputed = torch.zeros_like(mem.labels, dtype=torch.float32).scatter(1, mem.chosen, 1.0)
        mem.counts = recomputed if mem.counts is None else 0.5 * mem.counts + recomputed
        mem.chosen = torch.stack([_next_choice(delta[i], mem.labels[i], mem.counts[i], k, budget) for i in range(images)])

    def _cluster(self, noise: Tensor, grid: tuple[int, int], k: int) -> Tensor:
        features = 0.05 * noise + _position_code(grid, noise.shape[-1], noise.device)
        init = strided_targets(noise.shape[1], k, noise.device).expand(noise.shape[0], -1)
        return weighted_kmeans(features, None, init, self.kmeans_iterations)[0]

    def _image_ids(self, x: Tensor, mem: CatMemory) -> Tensor:
        """Each row's image: a call repeating the step's first call's input (split CFG) has its images;
        otherwise the two equal halves of a batch (batched CFG) are one image each, or every row its own."""
        offset = 0
        if mem.first_input is None:
            mem.first_input = x.detach()
        elif mem.first_input.shape == x.shape and _same(mem.first_input, x):
            return mem.images[0]
        else:
            offset = max(int(ids.max()) for ids in mem.images) + 1
        b, half = x.shape[0], x.shape[0] // 2
        paired = b % 2 == 0 and _same(x[:half], x[half:])
        return torch.arange(half if paired else b, device=x.device).repeat(2 if paired else 1) + offset

    def _guides(self, mem: CatMemory) -> Tensor:
        """``[I, N, D]``: each image's noise, from its last copy (its first with ``cond_first``)."""
        guide: dict[int, Tensor] = {}
        for ids, tokens in zip(mem.images, mem.fresh):
            for row, image in enumerate(ids.tolist()):
                if not (self.cond_first and image in guide):
                    guide[image] = tokens[row]
        return torch.stack([guide[i] for i in range(len(guide))])


def _same(a: Tensor, b: Tensor) -> bool:
    """Equal up to rounding: two copies of one latent, however a kernel batched them."""
    return bool((a - b).abs().amax() <= 1e-5 * a.abs().amax().clamp(min=1e-12))


def _patch_size(output: Tensor, grid: tuple[int, int]) -> tuple[int, int]:
    """The patch of the latent behind each token of the ``(rows, cols)`` grid in an output ``[B, C, H, W]``."""
    (h, w), (rows, cols) = output.shape[-2:], grid
    if h % rows or w % cols:
        raise ValueError(f"a {h}x{w} denoiser output does not split into the {rows}x{cols} token grid")
    return h // rows, w // cols


def _position_code(grid: tuple[int, int], dim: int, device: torch.device | str = "cpu") -> Tensor:
    """``[N, dim]``: each token's row / rows in the first ``dim // 2`` features, its column / cols in the rest."""
    rows, cols = grid
    index = torch.arange(rows * cols, device=device)
    row, col = (index // cols).float() / rows, (index % cols).float() / cols
    half = dim // 2
    return torch.cat([row[:, None].expand(-1, half), col[:, None].expand(-1, dim - half)], dim=1)


def _change_order(delta: Tensor) -> Tensor:
    """Tokens by descending ``|delta|``, ties to the lower position."""
    return torch.sort(delta.norm(dim=-1), descending=True, stable=True).indices


def _stale_order(counts: Tensor, by_change: Tensor) -> Tensor:
    """Tokens by ascending count, ties in ``by_change`` order."""
    return by_change[torch.sort(counts[by_change], stable=True).indices]


def _cluster_peaks(delta: Tensor, labels: Tensor, k: int) -> Tensor:
    """``[K, D]``: the channel-wise max of ``delta [N, D]`` over each cluster (torch_geometric's max_pool)."""
    index = labels[:, None].expand_as(delta)
    return delta.new_full((k, delta.shape[1]), -torch.inf).scatter_reduce(0, index, delta, "amax")


def _rank(values: Tensor) -> list[int]:
    return torch.sort(values, descending=True, stable=True).indices.tolist()


def _members(order: Tensor, labels: Tensor, cluster: int) -> Tensor:
    """The tokens of ``cluster``, in ``order``."""
    return order[labels[order] == cluster]


def _fill(chosen: Tensor, order: Tensor, budget: int) -> Tensor:
    """``chosen`` topped up to ``budget`` with the first tokens of ``order`` not in it, ascending."""
    taken = torch.zeros(order.shape[0], dtype=torch.bool, device=order.device)
    taken[chosen] = True
    extra = order[~taken[order]][: budget - chosen.shape[0]]
    return torch.cat([chosen, extra]).sort().values


def _first_choice(delta: Tensor, labels: Tensor, touching: Tensor, budget: int) -> Tensor:
    """CAT Pruning's first choice of ``budget`` tokens (ascending ``[budget]``) from the noise change
    ``delta [N, D]``, the clusters ``labels [N]`` and which clusters touch on the grid ``touching [K, K]``."""
    k = touching.shape[0]
    by_change = _change_order(delta)
    peaks = _cluster_peaks(delta, labels, k)
    near = touching | torch.eye(k, dtype=torch.bool, device=touching.device)
    mean = (near.float() @ peaks) / near.sum(dim=1, keepdim=True)
    top = torch.where(near[:, :, None], peaks[None], -torch.inf).amax(dim=1)
    picks, total = [], 0
    for cluster in _rank((2 * mean + top).norm(dim=-1)):
        members = _members(by_change, labels, cluster)
        take = min(budget // 10, members.shape[0])
        picks.append(members[:take])
        total += take
        if total > budget:
            break
    return _fill(torch.cat(picks)[:budget], by_change, budget)


def _next_choice(delta: Tensor, labels: Tensor, counts: Tensor, k: int, budget: int) -> Tensor:
    """CAT Pruning's choice of ``budget`` tokens (ascending ``[budget]``) after a recomputed step, from
    the noise change ``delta [N, D]``, the clusters ``labels [N]`` (``k`` of them) and the staleness
    ``counts [N]`` (the last step's tokens included)."""
    by_change = _change_order(delta)
    stale = _stale_order(counts, by_change)
    base = int(budget // 5 * 0.25)
    picks, total = [], 0
    for rank, cluster in enumerate(_rank(_cluster_peaks(delta, labels, k).norm(dim=-1))):
        members = _members(by_change, labels, cluster)
        take = min(base, members.shape[0])
        if rank < 3:
            take = min(take * (3 - rank), members.shape[0])
        chosen = members[:take]
        if rank:
            chosen = torch.unique(torch.cat([chosen, _members(stale, labels, cluster)[: int(take * 0.5)]]))
        picks.append(chosen)
        total += chosen.shape[0]
        if total > budget * 0.25:
            break
    part = torch.cat(picks)[: int(budget * 0.25)]
    return _fill(torch.unique(torch.cat([part, stale[: int(budget * 0.75)]])), stale, budget)
