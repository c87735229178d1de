"""``catp``: CATP (Li, Yang, Shen, Han, Xu, Tang, "CATP: Contextually Adaptive Token Pruning for
Efficient and Enhanced Multimodal In-Context Learning", AAAI 2026, arXiv 2508.07871). Paper only: no
code was published.

What we could read of the paper is its abstract: CATP "uses two stages of progressive pruning that
fully reflect the complex cross-modal interactions in the input sequence. After removing 77.8% of the
image tokens, CATP achieves an average performance gain of 0.6% over the vanilla model"; and the
project spec's summary of it (§5): "multi-image in-context learning: after the projector, diversity +
alignment with the paired text; then progressive pruning in shallow decoder layers from cross-modal
interactions". The scores below fill in what that wording leaves open; every such choice is named in
the class that makes it.

One name, two places, as ``todre``: ``tokenreduce.apply(vlm, "catp")`` builds :class:`CATP`, a preset
:class:`~tokenreduce.methods.stack.Stack` of :class:`CATPSelect` (pre-LLM) and :class:`CATPAttention`
(in-LLM). Each part is usable alone (``apply(vlm, CATPSelect(keep_ratio=0.25))``) or stacked with
another method; neither is registered under a name of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenreduce.core import Selection, keep
from tokenreduce.methods.llm import ImageSpan, LLMContext, check_layer
from tokenreduce.methods.pdrop import PyramidDrop
from tokenreduce.methods.stack import PresetStack
from tokenreduce.methods.visual import VisualContext, VisualMethod
from tokenreduce.registry import loadable, register_method
from tokenreduce.validate import as_real

PAPER = (
    "Li et al., CATP: Contextually Adaptive Token Pruning for Efficient and Enhanced Multimodal "
    "In-Context Learning, AAAI 2026, arXiv 2508.07871"
)
# 77.8% of the image tokens removed: 1/2 go before the LLM, then 2/3 and 4/9 of what enters it stay
# (576 -> 288 -> 192 -> 128 on LLaVA-1.5: 128 / 576 = 2/9 kept).
PRE_LLM_KEEP = 0.5
LLM_RATIOS = (2 / 3, 4 / 9)


def _unit_range(x: Tensor) -> Tensor:
    """``x [M, N]`` mapped per row onto [0, 1] (min to 0, max to 1; a constant row to 0)."""
    low, high = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    return (x - low) / (high - low).clamp(min=torch.finfo(x.dtype).tiny)


@loadable
@dataclass
class CATPSelect(VisualMethod):
    """CATP's first stage: after the projector, keep each image's tokens that score highest on
    diversity among the image's tokens plus alignment with the image's paired text.

    Scores, per image of ``N`` projected tokens ``v`` (in float32, cosine similarity ``cos``):
    - diversity ``d_i = 1 - mean_{j != i} cos(v_i, v_j)`` (a token unlike the rest of its image);
    - alignment ``a_i = mean_t cos(v_i, t)`` over the tokens ``t`` of the image's paired text, in the
      LLM's input-embedding space (:attr:`VisualContext.paired_text`): in an in-context prompt, the text
      after the image up to the next image (a demonstration's caption or answer; the query image's
      question). An image with no text before the next image has ``a = 0``: diversity alone ranks it;
    - ``score = (1 - alpha) * d' + alpha * a'``, ``d'`` and ``a'`` each mapped onto [0, 1] over the
      image (the two cosine scales differ, and the paper gives no weighting: ``alpha=0.5`` weighs them
      evenly).
    The ``keep`` best stay, in their original order; ties go to the lower index. One score ranks the
    tokens (a weighted sum), not a greedy joint subset search: the wording we have ("diversity +
    alignment") gives no search. Default ``keep_ratio=0.5`` (half the removal happens here, see
    :class:`CATP`).
    """

    name = "catp_select"
    paper = PAPER
    needs_text = True
    default_keep_ratio = PRE_LLM_KEEP

    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.alpha = as_real("alpha", self.alpha, 0, 1)

    def select(self, ctx: VisualContext) -> Selection:
        ctx.prompt_text(self.name)  # raises, naming the method, where the call has no prompt
        v = F.normalize(ctx.features.float(), dim=-1)
        n = v.shape[1]
        sim = v @ v.transpose(1, 2)  # [M, N, N]
        diversity = 1 - (sim.sum(dim=2) - sim.diagonal(dim1=1, dim2=2)) / max(1, n - 1)
        text = F.normalize(ctx.paired_text.float(), dim=-1)
        paired = ctx.paired_mask.to(text.dtype)  # [M, P]
        alignment = (v @ text.transpose(1, 2) * paired[:, None]).sum(dim=2) / paired.sum(dim=1, keepdim=True).clamp(min=1)
        score = (1 - self.alpha) * _unit_range(diversity) + self.alpha * _unit_range(alignment)
        picked = score.argsort(dim=1, descending=True, stable=True)[:, : ctx.keep]
        return keep(picked.sort(dim=1).values, n)


def paired_positions(span: ImageSpan, visual: Tensor, real: Tensor) -> Tensor:
    """Positions of ``span``'s paired text in its row: the real (``real [L]``) non-visual (``visual
    [L]``) tokens after the span, past any image right behind it, up to the next visual token."""
    after = torch.arange(span.start + span.length, visual.shape[0], device=visual.device)
    text = ~visual[after]
    begun = text.cumsum(0) > 0
    ended = (begun & ~text).cumsum(0) > 0
    return after[text & ~ended & real[after]]


@loadable
@dataclass
class CATPAttention(PyramidDrop):  # its stages, budget and checks; the raters and scoring layer are CATP's
    """CATP's second stage: progressive pruning in shallow LLM layers by cross-modal attention. Before
    each layer of ``layers``, each image keeps ``ratios[j]`` of the tokens it had at the LLM's input,
    ranked by the attention its paired text pays it at the layer before (softmax over the causal row,
    mean over heads and over the paired text's tokens: the text after the image up to the next image,
    as in :class:`CATPSelect`); each stage drops from what the previous one kept.

    Choices the wording ("progressive pruning in shallow decoder layers from cross-modal interactions")
    leaves open: the raters (the paired text; an image with none, such as one at the very end of the
    prompt, is rated by the prompt's last token, FastV's rater, and may then drop that token itself);
    the scoring layer (the one before each pruning layer, as it runs: FastV's); ``layers=None`` is
    ``(max(1, depth // 16), max(that + 1, depth // 8))``, layers 2 and 4 of LLaVA-1.5's 32;
    ``ratios=(2/3, 4/9)``; positions kept (``"keep"``): the kept tokens keep their position ids, as in
    the unpruned model. Ranking ties go to ``topk``'s order.
    """

    name = "catp_attention"
    paper = PAPER
    scores = "raters"
    scores_from = "previous"

    layers: Sequence[int] | None = None
    ratios: Sequence[float] = LLM_RATIOS
    positions: str = "keep"

    def prune_layers(self, depth: int) -> tuple[int, ...]:
        if self.layers is not None:
            return super().prune_layers(depth)
        if len(self.ratios) != 2:
            raise ValueError(f"the default layers hold 2 stages; pass layers for {len(self.ratios)} ratios")
        first = max(1, depth // 16)
        layers = (first, max(first + 1, depth // 8))
        for layer in layers:
            check_layer("layers", layer, depth)
        return layers

    def text_raters(self, hidden: Tensor, spans: list[ImageSpan], mask: Tensor) -> list[Tensor]:
        visual = torch.zeros_like(mask, dtype=torch.bool)
        for span in spans:
            visual[span.row, span.start : span.start + span.length] = True
        real = mask.bool()
        raters = []
        for span in spans:
            own = paired_positions(span, visual[span.row], real[span.row])
            raters.append(own if own.numel() else real[span.row].nonzero()[-1])
        return raters

    def select(self, ctx: LLMContext) -> list[Selection]:
        assert ctx.scores is not None
        spans = zip(ctx.spans, ctx.keep, ctx.scores)
        return [keep(score.topk(k).indices.sort().values[None], span.length) for span, k, score in spans]


@register_method
@dataclass
class CATP(PresetStack):
    """CATP: :class:`CATPSelect` keeps ``keep_ratio`` (or ``keep_tokens``) of each image's projected
    tokens by diversity + paired-text alignment (weight ``alpha``), then :class:`CATPAttention` prunes
    before LLM layers ``layers`` to ``ratios`` of what entered the LLM by the paired text's attention.
    Defaults ``keep_ratio=0.5``, ``ratios=(2/3, 4/9)``: 2/9 of the image tokens reach the deeper
    layers, the paper's "77.8% of the image tokens" removed (576 -> 288 -> 192 -> 128 on LLaVA-1.5),
    split evenly in count between the two stages (288 removed before the LLM, 160 inside it), the split
    being ours; ``layers=None`` (2 and 4 of a 32-layer LLM); ``positions="keep"`` in both stages."""

    name = "catp"
    paper = PAPER

    keep_ratio: float | None = None
    keep_tokens: int | None = None
    alpha: float = 0.5
    layers: Sequence[int] | None = None
    ratios: Sequence[float] = LLM_RATIOS
    positions: str = "keep"

    def __post_init__(self) -> None:
        self.before = CATPSelect(self.keep_ratio, self.keep_tokens, self.positions, alpha=self.alpha)
        self.inside = CATPAttention(layers=self.layers, ratios=self.ratios, positions=self.positions)
        self.keep_ratio, self.keep_tokens, self.alpha = self.before.keep_ratio, self.before.keep_tokens, self.before.alpha
        self.layers, self.ratios = self.inside.layers, self.inside.ratios
        super().__post_init__()
