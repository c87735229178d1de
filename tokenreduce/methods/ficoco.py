"""``ficoco``: FiCoCo-V (Han, Liu et al., "Filter, Correlate, Compress: Training-Free Token Reduction for
MLLM Acceleration", AAAI 2026, arXiv 2411.17686; v1 "Rethinking Token Reduction in MLLMs: Towards a
Unified Paradigm for Training-Free Acceleration")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokenreduce.core import Selection, mix
from tokenreduce.methods.visual import VisualContext, VisualMethod
from tokenreduce.registry import register_method
from tokenreduce.validate import as_int, as_real


@register_method
@dataclass
class FiCoCoV(VisualMethod):
    """Filter the most redundant patches of the vision layer the VLM reads, recycle each into the kept
    patches it attends to most, and give the LLM the kept patches in position order.

    The paper's three stages (FiCoCo-V): "a redundancy-based token discard mechanism that uses a novel
    integrated metric to accurately filter out redundant visual tokens", then "a correlation-based
    information recycling mechanism that allows preserved tokens to selectively recycle information from
    correlated discarded tokens with a self-preserving compression". The concrete rules follow the
    authors' code (``kawhiiiileo/FiCoCo``, ``llava/model/multimodal_encoder/FiCoCo_V`` as stored, read
    for this port), on ``A``, the layer's attention logits ``q k^T * scale`` averaged over heads:

    1. Filter: each patch's score is ``beta * cls / |cls| - (1 - beta) * sim / |sim|`` with ``cls`` the
       class token's logit to it (0 without a class token), ``sim`` its mean logit to all patches, both
       L2-normalised over the image's patches (``beta=0.35``). Local penalty: in every full
       ``window x window`` cell of the patch grid (``window=2``), the lowest score is halved if positive,
       doubled if not. The ``N - keep`` lowest-scored patches are discarded.
    2. Correlate: a discarded patch ``i`` recycles into the kept patches it attends to most (softmax of
       its row of ``A``), as many as its row has logits above the row's ``quantile`` (0.998), at least
       one; weights are those probabilities normalised over its targets.
    3. Compress: a kept patch ``j`` becomes ``(x_j + sum_i w_ij x_i) / (1 + sum_i w_ij)``, the
       size-weighted average the code computes with unit sizes ("self-preserving": its own weight is 1).

    Departures from the code, where it cannot be what the paper means or cannot serve a batch: it reduces
    ``r`` tokens after the attention of every CLIP layer past 11 (progressively) with one global
    score buffer shared by all images; here the reduction happens once, on the hidden states of the
    layer the VLM reads (the pre-LLM stage, like VisionZip), so the tower runs unreduced. Its targets may
    be any token (the token itself, the class token or another discarded one) and are then scattered
    by position into a sequence ordered by score; here targets are kept patches and outputs keep the
    image's order. Its recycling count is the largest over the batch; here each discarded patch has its
    own. The class token scores the patches but is never an output (LLaVA-1.5 reads patches only).
    Budget: ``keep_ratio`` (default 1/3: 192 of LLaVA-1.5's 576 patches) or ``keep_tokens``. On Qwen's
    merged 2x2 groups the logits are averaged over each pair of groups. Without a grid (a video) the
    local penalty is skipped.
    """

    name = "ficoco"
    paper = "Han et al., Filter, Correlate, Compress: Training-Free Token Reduction for MLLM Acceleration, AAAI 2026"
    space = "vision"
    needs_attention = True
    default_keep_ratio = 192 / 576

    beta: float = 0.35
    window: int = 2
    quantile: float = 0.998

    def __post_init__(self) -> None:
        super().__post_init__()
        self.beta = as_real("beta", self.beta, 0, 1)
        self.window = as_int("window", self.window, 1)
        self.quantile = as_real("quantile", self.quantile, 0, 1)

    def select(self, ctx: VisualContext) -> Selection:
        p, keep = ctx.num_prefix, ctx.keep
        m, t = ctx.features.shape[:2]
        n = t - p
        if keep > n:
            raise ValueError(f"keep must be at most the {n} patches of an image, got {keep}")
        logits = (ctx.q.float() @ ctx.k.float().transpose(-1, -2) * ctx.scale).mean(dim=1)
        if ctx.group > 1:
            logits = logits.unflatten(2, (t, ctx.group)).unflatten(1, (t, ctx.group)).mean(dim=(2, 4))
        scores = self.redundancy(logits, p, ctx.grid)
        order = scores.argsort(dim=1, stable=True)
        kept = order[:, n - keep :].sort(dim=1).values + p
        dropped = order[:, : n - keep] + p
        rows = torch.arange(m, device=logits.device)[:, None]
        matrix = torch.zeros(m, keep, t, device=logits.device)
        matrix[rows, torch.arange(keep, device=logits.device), kept] = 1.0
        if n > keep:
            probs = logits[rows, dropped].softmax(dim=-1)  # [M, D, T]
            above = logits[rows, dropped] > torch.quantile(logits[rows, dropped], self.quantile, dim=-1, keepdim=True)
            count = above.sum(dim=-1).clamp(min=1)  # [M, D]
            towards = probs.gather(2, kept[:, None].expand(-1, dropped.shape[1], -1))  # [M, D, keep]
            rank = towards.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
            weight = torch.where(rank < count[..., None], towards, 0.0)
            weight = weight / weight.sum(dim=-1, keepdim=True)
            matrix[rows, :, dropped] = weight
        return mix(matrix / matrix.sum(dim=-1, keepdim=True), index=kept)

    def redundancy(self, logits: Tensor, num_prefix: int, grid: tuple[int, int] | None) -> Tensor:
        """The integrated score ``[M, N]`` of each patch from the head-mean logits ``[M, T, T]`` (lowest:
        most redundant), local penalty included."""
        p = num_prefix
        patches = logits[:, p:, p:]
        cls = logits[:, 0, p:] if p else torch.zeros_like(patches[:, 0])
        sim = patches.mean(dim=-1)
        unit = torch.nn.functional.normalize
        scores = self.beta * unit(cls, dim=-1) - (1 - self.beta) * unit(sim, dim=-1)
        if grid is None or self.window > min(grid):
            return scores
        rows, cols = grid
        w = self.window
        hw, ww = rows // w, cols // w
        cells = scores.view(-1, rows, cols)[:, : hw * w, : ww * w].unflatten(1, (hw, w)).unflatten(3, (ww, w))
        cells = cells.permute(0, 1, 3, 2, 4).reshape(-1, hw, ww, w * w)
        low = cells.argmin(dim=-1)  # the first lowest in each cell
        y = torch.arange(hw, device=scores.device)[:, None] * w + low // w
        x = torch.arange(ww, device=scores.device)[None] * w + low % w
        where = (y * cols + x).flatten(1)  # [M, cells]
        value = scores.gather(1, where)
        return scores.scatter(1, where, torch.where(value > 0, value / 2, value * 2))
