"""``ficoco_l``: FiCoCo-L (Han, Liu et al., "Filter, Correlate, Compress: Training-Free Token Reduction
for MLLM Acceleration", AAAI 2026, arXiv 2411.17686), the variant inside the LLM decoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokenreduce.core import Selection, keep, mix
from tokenreduce.methods.llm import LLMContext, LLMMethod, check_layer, fraction
from tokenreduce.registry import register_method
from tokenreduce.validate import as_int, as_real

REFERENCE_DEPTH = 32
REFERENCE_FIRST = 6  # the code reduces inside layers 5..31 (``layer_idx > 4``): here before layers 6..31


@register_method
@dataclass
class FiCoCoL(LLMMethod):
    """Filter each image's most redundant tokens with text priors, recycle each into the kept tokens it
    correlates with most, at every decoder layer from ``layer`` on, ``step`` of the image's tokens at a
    time, down to ``keep_ratio`` of them.

    The paper's FiCoCo-L "leverages task-aware textual priors to perform token reduction directly within
    the LLM decoder" (abstract); its text is not readable here, so the rules follow the authors' code
    (``kawhiiiileo/FiCoCo``, ``llava/model/language_model/FiCoCo_L.py`` and ``llava_llama.py``, read for
    this port), on ``A``, the scoring layer's attention logits ``q k^T * scale`` (no mask, no softmax)
    averaged over heads, over an image's ``N`` tokens ``v`` and the text tokens ``t`` after it:

    1. Filter: each image token's score is ``beta * sum_j A[v_i, v_j] - (1 - beta) * mean_t A[v_i, t]``
       (its redundancy with the image minus its relevance to the text; ``beta=0.6``); the highest
       scored tokens are discarded (ties: the earlier one).
    2. Correlate: ``C = alpha * A_vv + (1 - alpha) * A_vt A_tv`` (direct and text-mediated correlation,
       ``alpha=0.6``) without its diagonal; a discarded token recycles into the kept tokens of highest
       ``softmax(C[i])``, as many as its row has entries above the row's ``quantile`` (0.998), at least
       one; weights are those probabilities normalised over its targets.
    3. Compress: a kept token becomes ``x_j + sum_i w_ij x_i`` (the code's ``mode="sum"``, unit sizes).

    Schedule: the code removes ``r=14`` of LLaVA-1.5's 576 tokens inside each of layers 5..31 (576 ->
    198). Here the reduction happens before each layer from ``layer`` (default the code's first reducing
    layer + 1 scaled to the depth, at least 1) to the last, scored with the previous layer's attention;
    each stage keeps ``N - round(stage_index * step * N)`` tokens (``step`` = 14/576), never fewer than
    ``round(keep_ratio * N)`` (default 192/576, at least 1). ``step=1`` reduces once, at ``layer``.
    Positions ``"auto"``: re-indexed on 1-D ids as the code's truncated ``position_ids``; M-RoPE ids keep
    their own.

    Departures from the code, where it cannot serve a batch or a general prompt: it takes the first 576
    tokens of the sequence as the image and every later token as text; here each image is its own
    span and its text the real non-image tokens after it. It merges between a layer's attention and its
    MLP; here between the scoring layer and the next (after the MLP), on the layer boundary the engine
    hooks. Its correlation targets may be any image token (recycling into another discarded one is then
    lost) and the recycling count is batch row 0's largest; here targets are kept tokens and each
    discarded token has its own count, from the quantile of its row without the (-inf) diagonal.
    """

    name = "ficoco_l"
    paper = "Han et al., Filter, Correlate, Compress: Training-Free Token Reduction for MLLM Acceleration, AAAI 2026"
    scores = "queries"

    layer: int | None = None  # first reducing layer; None: 6 of 32 scaled to the depth, at least 1
    step: float = 14 / 576  # share of an image's tokens removed per layer
    keep_ratio: float = 192 / 576  # the floor: share of an image's tokens kept at the end
    beta: float = 0.6  # filter: weight of redundancy against text relevance
    alpha: float = 0.6  # correlate: weight of direct against text-mediated correlation
    quantile: float = 0.998
    positions: str = "auto"

    def __post_init__(self) -> None:
        if self.layer is not None:
            self.layer = as_int("layer", self.layer, 1)
        self.step = fraction("step", self.step)
        self.keep_ratio = fraction("keep_ratio", self.keep_ratio)
        self.beta = as_real("beta", self.beta, 0, 1)
        self.alpha = as_real("alpha", self.alpha, 0, 1)
        self.quantile = as_real("quantile", self.quantile, 0, 1)
        self.check_positions()

    def prune_layers(self, depth: int) -> tuple[int, ...]:
        first = self.layer if self.layer is not None else max(1, REFERENCE_FIRST * depth // REFERENCE_DEPTH)
        check_layer("layer", first, depth)
        return tuple(range(first, depth))

    def kept(self, tokens: int, stage: int) -> int:
        floor = max(1, round(self.keep_ratio * tokens))
        return max(floor, tokens - round((stage + 1) * self.step * tokens))

    def select(self, ctx: LLMContext) -> list[Selection]:
        assert ctx.queries is not None and ctx.keys is not None and ctx.scale is not None and ctx.visual is not None
        out = []
        for i, (span, k) in enumerate(zip(ctx.spans, ctx.keep)):
            row, start, n = span.row, span.start, span.length
            if k >= n:
                out.append(keep(torch.arange(n, device=ctx.mask.device)[None], n))
                continue
            after = torch.arange(start + n, ctx.mask.shape[1], device=ctx.mask.device)
            after = after[ctx.mask[row, after].bool() & ~ctx.visual[row, after]]
            if after.shape[0] == 0:
                raise ValueError(f"ficoco_l rates each image by the text after it; image {i} (row {row}) has none")
            tokens = torch.cat([torch.arange(start, start + n, device=after.device), after])
            logits = self.logits(ctx.queries[row], ctx.keys[row], tokens, ctx.scale)
            out.append(self.reduce(logits, n, k))
        return out

    @staticmethod
    def logits(queries: Tensor, keys: Tensor, tokens: Tensor, scale: float) -> Tensor:
        """Head-mean logits ``[T, T]`` among ``tokens`` from one row's ``queries [H, L, D]`` and ``keys
        [H_kv, L, D]`` (grouped heads share their key head)."""
        q = queries[:, tokens].float()
        k = keys[:, tokens].float().repeat_interleave(queries.shape[0] // keys.shape[0], dim=0)
        return (q @ k.transpose(-1, -2) * scale).mean(dim=0)

    def reduce(self, logits: Tensor, n: int, k: int) -> Selection:
        """One image of ``n`` tokens (the first ``n`` of ``logits [T, T]``, text after) down to ``k``."""
        vv, vt, tv = logits[:n, :n], logits[:n, n:], logits[n:, :n]
        score = self.beta * vv.sum(dim=-1) - (1 - self.beta) * vt.mean(dim=-1)
        order = score.argsort(descending=True, stable=True)
        dropped, kept = order[: n - k], order[n - k :].sort().values
        off = ~torch.eye(n, dtype=torch.bool, device=logits.device)
        correlation = (self.alpha * vv + (1 - self.alpha) * vt @ tv).masked_fill(~off, float("-inf"))[dropped]
        others = correlation[off[dropped]].view(n - k, n - 1)
        count = (others > torch.quantile(others, self.quantile, dim=-1, keepdim=True)).sum(dim=-1).clamp(min=1)
        towards = correlation.softmax(dim=-1)[:, kept]  # [n - k, k]
        rank = towards.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        weight = torch.where(rank < count[:, None], towards, 0.0)
        matrix = torch.zeros(k, n, device=logits.device)
        matrix[torch.arange(k, device=logits.device), kept] = 1.0
        matrix[:, dropped] = (weight / weight.sum(dim=-1, keepdim=True)).T
        return mix(matrix[None], index=kept[None])
