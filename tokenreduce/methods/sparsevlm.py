"""``sparsevlm``: SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient
Vision-Language Model Inference", ICML 2025), its v1.5 release."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tokenreduce.core import Selection, density_peaks, keep, keep_and_cluster
from tokenreduce.methods.llm import ImageSpan, LLMContext, LLMMethod, check_layer
from tokenreduce.registry import register_method
from tokenreduce.validate import as_bool, as_int_tuple

REFERENCE_TOKENS = 576  # LLaVA-1.5's visual tokens, for which the budgets are written
REFERENCE_DEPTH = 32
REFERENCE_LAYERS = (2, 6, 15)
BUDGETS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}  # score.py, v1.5
RECYCLED = 0.3  # share of the dropped tokens recycled into merged ones


@register_method
@dataclass
class SparseVLM(LLMMethod):
    """Text-guided pruning at a few LLM layers, with the best dropped tokens recycled.

    From the reference (``Gumpest/SparseVLMs`` at 26a5f48, ``modelling_sparse_llama.py`` and
    ``score.py``, version 1.5):
    1. Raters, once, on the LLM's input: per image, ``m = softmax over the text tokens after it of
       (V T^T)`` averaged over its visual tokens ``V``; the text tokens with ``m > mean(m)`` rate it.
    2. At each layer of ``layers`` (the reference's ``pruning_loc``, 0-based), that layer's attention
       (mean over heads) from the raters' rows, averaged over raters, scores the image's current tokens;
       the top ``min(budget, tokens - 1)`` stay, and the dropped ones are gone from the next layer on.
    3. Recycling: the top 30% (+1) of the dropped tokens by that score are clustered (DPC-kNN, as
       ``cluster_and_merge``: ``count / 10 + 1`` clusters, as many neighbours for the density) into
       averaged tokens placed after the kept ones, which later stages score like any other.
    Budgets are the reference's per-stage counts for ``retain`` = 192, 128, 96 or 64 tokens of a
    576-token LLaVA-1.5 image (``budgets`` gives other counts), scaled by ``tokens / 576`` for images of
    another size; positions re-indexed as the reference's ``position_ids[:, :L']`` (``"auto"``: on
    1-D positions; Qwen's M-RoPE ids keep theirs, a merged token taking its cluster centre's).

    Choices the reference leaves open: ``layers=None`` scales (2, 6, 15) of 32 layers to the model's
    depth; each image of a prompt has its own raters among the text after it; cluster densities that tie
    are ordered by position (the reference adds 1e-6 random noise).
    """

    name = "sparsevlm"
    paper = "Zhang et al., SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference, ICML 2025"
    scores = "raters"

    retain: int = 192
    layers: Sequence[int] | None = None
    budgets: Sequence[int] | None = None
    recycle: bool = True
    positions: str = "auto"

    def __post_init__(self) -> None:
        if self.budgets is None:
            if self.retain not in BUDGETS:
                raise ValueError(f"retain must be one of {sorted(BUDGETS)} (the reference's budgets), got {self.retain!r}")
            self.budgets = BUDGETS[self.retain]
        else:
            self.budgets = as_int_tuple("budgets", self.budgets, 1, REFERENCE_TOKENS)
        if self.layers is not None:
            self.layers = as_int_tuple("layers", self.layers, 0)
            if len(self.layers) != len(self.budgets) or list(self.layers) != sorted(set(self.layers)):
                raise ValueError(
                    f"layers must be {len(self.budgets)} increasing layer indices (one per budget), got {self.layers}"
                )
        self.recycle = as_bool("recycle", self.recycle)
        self.check_positions()

    def prune_layers(self, depth: int) -> tuple[int, ...]:
        layers = self.layers or tuple(layer * depth // REFERENCE_DEPTH for layer in REFERENCE_LAYERS)
        if len(set(layers)) != len(layers):
            raise ValueError(f"an LLM of {depth} layers cannot hold {len(layers)} pruning stages; pass layers")
        for layer in layers:
            check_layer("layers (+1: pruning follows the layer)", layer + 1, depth)
        return tuple(layer + 1 for layer in layers)

    def kept(self, tokens: int, stage: int) -> int:
        return max(1, round(self.budgets[stage] * tokens / REFERENCE_TOKENS))

    def text_raters(self, hidden: Tensor, spans: list[ImageSpan], mask: Tensor) -> list[Tensor]:
        visual = torch.zeros_like(mask, dtype=torch.bool)
        for span in spans:
            visual[span.row, span.start : span.start + span.length] = True
        raters = []
        for i, span in enumerate(spans):
            after = torch.arange(span.start + span.length, mask.shape[1], device=mask.device)
            after = after[mask[span.row, after].bool() & ~visual[span.row, after]]
            if after.shape[0] == 0:
                raise ValueError(f"sparsevlm rates each image by the text after it; image {i} (row {span.row}) has none")
            v = hidden[span.row, span.start : span.start + span.length].float()
            m = (v @ hidden[span.row, after].float().T).softmax(dim=-1).mean(dim=0)
            raters.append(after[m > m.mean()])
        return raters

    def select(self, ctx: LLMContext) -> list[Selection]:
        assert ctx.scores is not None
        out = []
        for span, budget, score in zip(ctx.spans, ctx.keep, ctx.scores):
            n = span.length
            kept = score.topk(max(1, min(budget, n - 1))).indices.sort().values
            if not self.recycle or kept.shape[0] == n:
                out.append(keep(kept[None], n))
                continue
            dropped = torch.ones(n, dtype=torch.bool, device=score.device)
            dropped[kept] = False
            dropped = dropped.nonzero().flatten()
            count = min(int(dropped.shape[0] * RECYCLED) + 1, dropped.shape[0])
            chosen = dropped[score[dropped].topk(count).indices]
            clusters = count // 10 + 1
            states = ctx.hidden[span.row, span.start + chosen]
            assignment, centres = density_peaks(states, clusters, clusters)
            out.append(keep_and_cluster(kept, chosen, assignment, centres, n))
        return out
