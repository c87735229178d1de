"""``trimmed_llama``: Trimmed Llama (Lee et al., "Efficient LLaMA-3.2-Vision by Trimming Cross-attended
Visual Features", arXiv 2504.00557, 2025). Paper only: no public code."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenreduce.core import Selection, keep
from tokenreduce.methods.cross_attention import CrossAttentionContext, CrossAttentionMethod
from tokenreduce.methods.llm import fraction
from tokenreduce.registry import register_method


@register_method
@dataclass
class TrimmedLlama(CrossAttentionMethod):
    """At the first cross-attention layer, each head keeps the image features the prompt's text attends
    to most; the union over heads is what every cross-attention layer (that one included) reads as keys
    and values from then on, and what their KV cache holds.

    Paper only (read through its abstract and the authors' summary of the method on the Nota AI blog;
    the arXiv method section was not read). The rule implemented is theirs: the method "uses headwise
    attention scores from language sequences to remove unimportant image features. In the first
    cross-attention layer, each head selects the top-k most salient features based on attention scores.
    The union of these top-k sets across all heads forms the final selection", so that "the pruning
    ratios are adaptively allocated" (the kept count depends on the prompt); they report "leveraging
    40~50% of the image features".

    Choices the paper leaves open, made here:
    - a head's score of a feature is the sum, over the prompt tokens that read the image (those whose
      cross-attention row is not fully masked), of that token's softmax attention to the feature
      (queries and keys of the first cross-attention layer, recomputed beside its own attention);
    - k is ``round(keep_ratio * N)`` (at least 1) of a row's ``N`` features, padding tiles included
      (they are masked, score 0 and come last), default ``keep_ratio=0.5``: the union keeps at least
      that share and at most ``heads * k`` features, so lower ``keep_ratio`` to keep less;
    - equal scores go to the earlier feature; the kept features stay in their order;
    - the first cross-attention layer itself runs on the kept features (it scores them first), so its
      KV cache is trimmed too (the paper's figure: "Image features are pruned in the first
      cross-attention block ... The features serve as inputs for the keys and values in subsequent
      cross-attention layers"; whether that block's own prefill read all of them is not said);
    - every image of a prompt is trimmed as one set of features;
    - batch > 1: each row keeps its own union; shorter rows are padded to the longest with masked
      copies of a kept feature (no query attends them), so a row gives what it gives alone.
    """

    name = "trimmed_llama"
    paper = "Lee et al., Efficient LLaMA-3.2-Vision by Trimming Cross-attended Visual Features, arXiv 2504.00557, 2025"

    keep_ratio: float = 0.5  # share of a row's image features each head keeps before the union

    def __post_init__(self) -> None:
        self.keep_ratio = fraction("keep_ratio", self.keep_ratio)

    def per_head(self, features: int) -> int:
        """Features each head keeps (k) among ``features``."""
        return min(features, max(1, round(self.keep_ratio * features)))

    def select(self, ctx: CrossAttentionContext) -> list[Selection]:
        b, _, n = ctx.received.shape
        top = ctx.received.argsort(dim=-1, descending=True, stable=True)[..., : self.per_head(n)]
        chosen = torch.zeros(b, n, dtype=torch.bool, device=top.device)
        chosen.scatter_(1, top.flatten(1), True)
        return [keep(row.nonzero()[:, 0][None], n) for row in chosen]

    def describe_rule(self) -> str:
        return f"each head keeps the top {self.keep_ratio:g} of the image features its text attends to; the union stays"
