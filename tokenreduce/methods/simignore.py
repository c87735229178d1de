"""``simignore``: Simignore (Zhang et al., "Enhancing Multimodal Large Language Models Complex Reason via
Similarity Computation", AAAI 2025)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenreduce.core import Selection, keep
from tokenreduce.methods.visual import VisualContext, VisualMethod
from tokenreduce.registry import register_method

K2, IMAGE_TOKENS = 452, 576  # the reference's k2 image tokens attended of LLaVA-1.5's 576


@register_method
@dataclass
class Simignore(VisualMethod):
    """Keep the image tokens most cosine-similar to the prompt's text; the LLM ignores the rest.

    From the reference (``FanshuoZeng/Simignore`` ``src/LLaVA/llava/model/llava_arch.py``, read at
    85356db): ``S = normalize(image) @ normalize(text)^T`` over each image's projected tokens and the
    text embeddings; all (image, text) pairs sorted by ``S`` descending are walked from index 1 (the
    top pair is skipped), collecting each pair's image token the first time it appears, until ``k2``
    are collected; the other image tokens are ignored. Since walking the sorted pairs meets each image
    token first at its best pair, this keeps the ``k2`` tokens whose best similarity (the skipped top
    pair left out) is highest; ties go to the earlier token, as a stable sort of the pairs would.

    Departures and choices the reference leaves open:
    - Ignored tokens are removed, not masked (the reference sets their ``attention_mask`` to 0 and
      gains no speed): with ``positions="keep"`` (the default here) the kept tokens keep their original
      position ids, so every kept and text token computes what it would with the reference's mask.
    - The text is the whole prompt's text (every token but image placeholders and padding, see
      :class:`~tokenreduce.methods.visual.VisualContext`); the reference cuts the ScienceQA options
      out of its prompt with marker token ids of its own tokenizer.
    - When the top pair's image token has no other pair (one text token) the reference never
      collects it; here it ranks last, so keep-all keeps it.
    - Budget: ``keep_ratio`` default 452/576 (the reference's ``k2 = 452`` on 576 tokens), or
      ``keep_tokens``; similarities in float32 whatever the model's dtype.
    """

    name = "simignore"
    paper = "Zhang et al., Enhancing Multimodal Large Language Models Complex Reason via Similarity Computation, AAAI 2025"
    needs_text = True
    default_keep_ratio = K2 / IMAGE_TOKENS

    positions: str = "keep"

    def select(self, ctx: VisualContext) -> Selection:
        text, text_mask = ctx.prompt_text(self.name)
        image = F.normalize(ctx.features.float(), dim=-1)
        sim = image @ F.normalize(text.float(), dim=-1).transpose(1, 2)  # [M, N, T]
        flat = sim.masked_fill(~text_mask[:, None, :], -torch.inf).flatten(1)
        flat = flat.scatter(1, flat.argmax(dim=1, keepdim=True), -torch.inf)  # the walk starts at index 1
        best = flat.view_as(sim).amax(dim=2)
        picked = best.argsort(dim=1, descending=True, stable=True)[:, : ctx.keep]
        return keep(picked.sort(dim=1).values, ctx.features.shape[1])
