"""``greedyprune``: GreedyPrune (Pei et al., "GreedyPrune: Retenting Critical Visual Token Set for Large
Vision Language Models", arXiv 2506.13166, 2025). Paper only: no public code."""

from __future__ import annotations

from dataclasses import dataclass

from tokenreduce.core import Selection, keep, salient_dissimilar_subset
from tokenreduce.methods.fastv import FastV
from tokenreduce.methods.llm import LLMContext
from tokenreduce.registry import register_method
from tokenreduce.validate import as_real


@register_method
@dataclass
class GreedyPrune(FastV):
    """Before LLM layer ``layer`` (K), keep the ``keep_ratio`` share of each image's tokens chosen greedily
    for semantic saliency under a diversity constraint; the rest are gone from layer K on, KV cache
    included, and kept tokens keep their positions.

    Paper only. The rule implemented is the paper's "combinatorial objective over semantic saliency
    (cross-attention) and visual diversity, solved greedily", in the form its method section gives (read
    through a summary of it; the paper itself was not read in full): select ``S`` of size ``M``
    "maximizing sum_{v_i in S} w_i subject to cos(v_i, v_j) <= tau for all v_i, v_j in S, i != j",
    solved greedily: tokens in decreasing saliency ``w``, each kept only if within ``tau`` of every token
    kept so far (:func:`~tokenreduce.core.salient_dissimilar_subset`).

    Choices the paper leaves open here (its ``tau`` and where it scores were not read): the selection
    runs inside the LLM before layer K (default 2, FastV's); the saliency ``w`` is the causal attention
    of each row's last prompt token to the image's tokens at layer K-1, averaged over heads (FastV's
    score); ``v`` are the tokens' hidden states at layer K's input; ``tau=0.8``; when fewer than ``M``
    tokens satisfy the constraint, the most salient of the others fill the budget, so each image keeps
    exactly ``M = round(tokens * keep_ratio)`` (at least 1); ties in saliency go to the earlier token;
    each image of a prompt is selected on its own.
    """

    name = "greedyprune"
    paper = (
        "Pei et al., GreedyPrune: Retenting Critical Visual Token Set for Large Vision Language Models, arXiv 2506.13166, 2025"
    )

    keep_ratio: float = 0.25
    tau: float = 0.8  # the most cosine similarity two kept tokens may have

    def __post_init__(self) -> None:
        super().__post_init__()  # FastV's layer, keep_ratio and positions: one pruning layer
        self.tau = as_real("tau", self.tau, -1, 1)

    def select(self, ctx: LLMContext) -> list[Selection]:
        assert ctx.attention is not None
        out = []
        for span, k in zip(ctx.spans, ctx.keep):
            part = slice(span.start, span.start + span.length)
            picked = salient_dissimilar_subset(ctx.attention[span.row, part], ctx.hidden[span.row, part], k, self.tau)
            out.append(keep(picked.sort().values[None], span.length))
        return out
