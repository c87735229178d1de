"""``star``: STAR (Guo et al., "STAR: Stage-Wise Attention-Guided Token Reduction for Efficient Large
Vision-Language Models Inference", arXiv 2505.12359, 2025). Paper only: no public code."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tokenreduce.core import Selection, keep, received_attention
from tokenreduce.methods.llm import LLMContext, LLMMethod, check_layer, fraction
from tokenreduce.registry import register_method
from tokenreduce.validate import as_int_tuple, as_sequence

EARLY = 1  # the first layer the LLM stage can prune before


@register_method
@dataclass
class STAR(LLMMethod):
    """Two pruning stages, each keeping an image's tokens that receive the most (parameter-free) attention
    from its own kind of query, among the tokens the stage before kept; kept tokens stay in order with
    their original positions.

    Paper only. The rule implemented is the paper's "early-stage pruning based on visual self-attention
    to remove redundant low-level features, and a later-stage pruning guided by cross-modal attention to
    discard task-irrelevant tokens", with the scores as its method section gives them (read through a
    summary of it; the paper itself was not read in full):
    1. early, ``A = Softmax(H_v H_v^T / sqrt(d))`` over the image's visual tokens ``H_v`` and ``r_i`` the
       attention token ``i`` receives averaged over the image's tokens; the top ``(1 - R) L_v`` stay
       (here ``ratios[0]`` of the image's tokens);
    2. at a decoder layer K, ``C_K = Softmax(H_v H_q^T / sqrt(d))`` between the remaining visual tokens
       and the text, ``r_i`` averaged over the text positions; the top ``ratios[1]`` of the image's
       tokens at the LLM's input stay.
    Both are dot products of hidden states (no projections, no heads), softmax over the image's tokens.

    Choices the paper leaves open or that this engine makes: the early stage acts before LLM layer
    ``layers[0]`` (default 1) on that layer's input, the closest the LLM stage comes to the paper's
    "immediately following the vision encoder" (which scores the projected tokens themselves); K is
    ``layers[1]`` (default: half the depth, "an intermediate decoder layer"); the text is the real
    tokens after the image (the instruction; the paper's generated-response embeddings do not exist
    during the prefill); each image of a prompt is scored on its own; ratios default to (0.5, 0.25);
    the kept count is ``round(tokens * ratio)`` (at least 1); equal scores (a softmax saturated on
    large hidden states gives many) go to the earlier token.
    """

    name = "star"
    paper = (
        "Guo et al., STAR: Stage-Wise Attention-Guided Token Reduction for Efficient Large Vision-Language Models "
        "Inference, arXiv 2505.12359, 2025"
    )

    scores = "keys"  # the engine's cheapest score (no attention row); STAR reads the hidden states only

    layers: Sequence[int] | None = None
    ratios: Sequence[float] = (0.5, 0.25)
    positions: str = "keep"

    def __post_init__(self) -> None:
        ratios = as_sequence("ratios", self.ratios, "two fractions in (0, 1]")
        self.ratios = tuple(fraction(f"ratios[{i}]", r) for i, r in enumerate(ratios))
        if len(self.ratios) != 2 or self.ratios[1] > self.ratios[0]:
            raise ValueError(f"ratios must be two non-increasing fractions in (0, 1] (early, late), got {self.ratios}")
        if self.layers is not None:
            self.layers = as_int_tuple("layers", self.layers, 1)
            if len(self.layers) != 2 or self.layers[0] >= self.layers[1]:
                raise ValueError(f"layers must be two increasing layer indices (early, late), got {self.layers}")
        self.check_positions()

    def prune_layers(self, depth: int) -> tuple[int, ...]:
        layers = self.layers or (EARLY, max(EARLY + 1, depth // 2))
        for layer in layers:
            check_layer("layers", layer, depth)
        return tuple(layers)

    def kept(self, tokens: int, stage: int) -> int:
        return min(tokens, max(1, round(self.ratios[stage] * tokens)))

    def select(self, ctx: LLMContext) -> list[Selection]:
        assert ctx.visual is not None
        out = []
        for i, span in enumerate(ctx.spans):
            image = ctx.hidden[span.row, span.start : span.start + span.length]
            if ctx.stage == 0:
                queries = image
            else:
                after = torch.arange(span.start + span.length, ctx.hidden.shape[1], device=ctx.hidden.device)
                after = after[ctx.mask[span.row, after].bool() & ~ctx.visual[span.row, after]]
                if after.shape[0] == 0:
                    raise ValueError(
                        f"star scores each image's late stage by the text after it; image {i} (row {span.row}) has none"
                    )
                queries = ctx.hidden[span.row, after]
            score = self.score(queries, image)
            best = score.sort(descending=True, stable=True).indices[: ctx.keep[i]]  # ties: the earlier token
            out.append(keep(best.sort().values[None], span.length))
        return out

    @staticmethod
    def score(queries: Tensor, image: Tensor) -> Tensor:
        """``[N]``: the attention each of the ``image [N, D]`` tokens receives from ``queries [Q, D]``."""
        return received_attention(queries[None, None], image[None, None], 1 / math.sqrt(image.shape[-1]))[0]
