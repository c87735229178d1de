"""``recoverable``: Recoverable Compression (Chen et al., "Recoverable Compression: A Multimodal Vision Token
Recovery Mechanism Guided by Text Information", AAAI 2025, arXiv 2409.01179)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenreduce.core import Selection, keep, merge_into_nearest
from tokenreduce.methods.visual import VisualContext, VisualMethod
from tokenreduce.registry import register_method
from tokenreduce.validate import as_real


@register_method
@dataclass
class Recoverable(VisualMethod):
    """Keep the tokens the vision encoder's class token attends to most, recover dropped tokens the
    prompt's text is most similar to, and merge every other token into its nearest kept token.

    Paper only (``banjiuyufen/RecoverableCompression`` not read). The rule implemented, in the
    spec's wording of the paper: "pre-LLM: visual-only pruning (CLS signal), then question–visual
    similarity recovers dropped tokens; the rest merged", with "comparable performance with ~10% of
    visual tokens on average". Per image of ``N`` projected tokens and a budget of ``keep``:

    1. Visual-only pruning: the ``keep - round(recover * keep)`` tokens with the highest class-token
       attention (softmax, averaged over heads) at the vision layer the VLM reads.
    2. Text-guided recovery: each dropped token's relevance is its highest cosine similarity to a text
       token of its prompt; the ``round(recover * keep)`` most relevant are recovered (ties: the higher
       class-token attention first).
    3. The rest merged: every other token joins the kept token whose projected feature is most
       cosine-similar; a kept token becomes the plain mean of itself and the tokens that joined it.
    The LLM reads the kept tokens in their original order.

    Choices the paper leaves open here (its thresholds and merge rule are not recorded): the budget is
    fixed per image, ``keep_ratio`` default 0.1 (the paper's average; its own count varies per image,
    which the LLM's image placeholders cannot follow yet) or ``keep_tokens``; ``recover`` (default
    0.5) is the share of that budget recovered by the text; "question" is the whole prompt's text in
    the LLM's input-embedding space, compared with the projected tokens (see
    :class:`~tokenreduce.methods.visual.VisualContext`); merging is a plain mean into the nearest kept
    token. Needs a vision tower with a class token whose images each fill one prompt span (LLaVA).
    """

    name = "recoverable"
    paper = (
        "Chen et al., Recoverable Compression: A Multimodal Vision Token Recovery Mechanism Guided by Text Information, AAAI 2025"
    )
    needs_text = True
    needs_cls_attention = True
    default_keep_ratio = 0.1

    recover: float = 0.5  # share of each image's budget recovered by text similarity

    def __post_init__(self) -> None:
        super().__post_init__()
        self.recover = as_real("recover", self.recover, 0, 1)

    def select(self, ctx: VisualContext) -> Selection:
        text, text_mask = ctx.prompt_text(self.name)
        if ctx.cls_attention is None:
            raise ValueError(f"method {self.name!r} reads the vision encoder's class-token attention, and this call has none")
        x, n = ctx.features, ctx.features.shape[1]
        recovered = round(self.recover * ctx.keep)
        by_cls = ctx.cls_attention.argsort(dim=1, descending=True, stable=True)
        visual, dropped = by_cls[:, : ctx.keep - recovered], by_cls[:, ctx.keep - recovered :]
        sim = F.normalize(x.float(), dim=-1) @ F.normalize(text.float(), dim=-1).transpose(1, 2)  # [M, N, T]
        relevance = sim.masked_fill(~text_mask[:, None, :], -torch.inf).amax(dim=2).gather(1, dropped)
        dropped = dropped.gather(1, relevance.argsort(dim=1, descending=True, stable=True))
        kept = torch.cat([visual, dropped[:, :recovered]], dim=1).sort(dim=1).values
        rest = dropped[:, recovered:]
        if rest.shape[1] == 0:
            return keep(kept, n)
        slot, _ = merge_into_nearest(x, kept, rest, n)
        return Selection(slot, kept, mean=True)
