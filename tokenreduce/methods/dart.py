"""``dart``: DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More", 2025)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenreduce.core import Selection, keep
from tokenreduce.methods.llm import LLMContext, LLMMethod, check_layer, fraction
from tokenreduce.registry import register_method
from tokenreduce.validate import as_int


@register_method
@dataclass
class DART(LLMMethod):
    """Before LLM layer ``layer`` (K), keep each image's tokens least duplicated with a few pivots.

    From the reference (``ZichenWen1/DART``, read through the fork ``xqy1111111/DART`` at d6a5af6,
    ``get_retained_image_token``): pivots are the ``image_pivots`` image tokens and the
    ``text_pivots`` tokens after the image whose keys at layer K-1 (rotary applied, all heads) have
    the largest L1 norm; every pivot in turn picks the ``per_pivot = floor(N * keep_ratio / pivots)``
    remaining image tokens least cosine-similar to it, comparing layer K's input passed through the
    LLM's final norm; the image keeps its pivots and the picked tokens, in order, with their original
    positions. So an image of ``N`` tokens keeps ``image_pivots + pivots * per_pivot`` (the reference's
    default ``keep_ratio=0.222`` of 576: 4 + 8 * 15 = 124).

    Choices the reference leaves open: pivots pick in increasing position order (the reference walks
    a Python set of indices, whose order is CPython's); with several images per prompt each image has
    its own pivots, its text pivots taken among the text tokens after it (the reference has one image
    and batch 1); the reference's ``max_num_trunction`` override of the budget is ``keep_ratio``'s job.
    The L1 norm of rotated keys depends on absolute positions: pass padded batches the position ids
    ``generate`` gives them (counted over real tokens), or rows pick as if their padding were text.
    """

    name = "dart"
    paper = "Wen et al., Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More, 2025"
    scores = "keys"

    layer: int = 2
    keep_ratio: float = 0.222
    image_pivots: int = 4
    text_pivots: int = 4
    positions: str = "keep"

    def __post_init__(self) -> None:
        self.layer = as_int("layer", self.layer, 1)
        self.keep_ratio = fraction("keep_ratio", self.keep_ratio)
        self.image_pivots = as_int("image_pivots", self.image_pivots, 1)
        self.text_pivots = as_int("text_pivots", self.text_pivots, 0)
        self.check_positions()

    def prune_layers(self, depth: int) -> tuple[int, ...]:
        check_layer("layer", self.layer, depth)
        return (self.layer,)

    def per_pivot(self, tokens: int) -> int:
        return int(tokens * self.keep_ratio) // (self.image_pivots + self.text_pivots)

    def kept(self, tokens: int, stage: int) -> int:
        if self.image_pivots > tokens:
            raise ValueError(f"image_pivots must be at most the {tokens} visual tokens of an image, got {self.image_pivots}")
        return min(tokens, self.image_pivots + (self.image_pivots + self.text_pivots) * self.per_pivot(tokens))

    def select(self, ctx: LLMContext) -> list[Selection]:
        assert ctx.keys is not None and ctx.norm is not None and ctx.visual is not None
        norms = ctx.keys.float().abs().sum(dim=(1, 3))  # [B, L]: L1 over all heads
        states = ctx.norm(ctx.hidden).float()
        out = []
        for span in ctx.spans:
            row, start, n = span.row, span.start, span.length
            per_pivot = self.per_pivot(n)
            image = torch.arange(start, start + n, device=norms.device)
            after = torch.arange(start + n, norms.shape[1], device=norms.device)
            after = after[ctx.mask[row, after].bool() & ~ctx.visual[row, after]]
            pivots = image[norms[row, image].topk(self.image_pivots).indices]
            text = after[norms[row, after].topk(min(self.text_pivots, after.shape[0])).indices]
            picked = pivots.tolist()
            free = torch.ones(n, dtype=torch.bool, device=norms.device)
            free[pivots - start] = False
            for pivot in sorted(pivots.tolist() + text.tolist()):
                candidates = image[free]
                if candidates.shape[0] == 0 or per_pivot == 0:
                    break
                similarity = torch.nn.functional.cosine_similarity(states[row, pivot][None], states[row, candidates], dim=-1)
                chosen = candidates[(-similarity).topk(min(per_pivot, candidates.shape[0])).indices]
                free[chosen - start] = False
                picked += chosen.tolist()
            out.append(keep(torch.tensor(sorted(picked), device=norms.device)[None] - start, n))
        return out
