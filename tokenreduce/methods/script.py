"""``script``: Script ("Script: Graph-Structured and Query-Conditioned Semantic Token Pruning for Multimodal
Large Language Models", TMLR 2025, arXiv 2512.01949). Paper only."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenreduce.core import Selection, greedy_dpp, keep
from tokenreduce.methods.visual import VisualContext, VisualMethod
from tokenreduce.registry import register_method
from tokenreduce.validate import as_real


@register_method
@dataclass
class Script(VisualMethod):
    """Keep the tokens that both a redundancy graph and a query-conditioned DPP rank early.

    Paper only (the spec §5, unverified: "graph pruning: bipartite src/dst by alternating index, cosine
    edges above τ, redundancy from degree and mean similarity; query-conditioned pruning by a DPP;
    outputs intersected"). The rule as implemented, on each image's projected tokens ``v [N, D]`` and
    its prompt's text:

    1. Graph: tokens at even indices are sources, odd ones destinations; an edge joins a source and a
       destination whose cosine similarity is above ``tau``. A token's redundancy is its degree times
       the mean similarity over its edges (the summed similarity of its edges; 0 without edges); the
       graph ranks tokens by increasing redundancy (equal: the lower index first).
    2. Query-conditioned DPP: relevance ``r_i = cos(v_i, q)`` with ``q`` the mean of the prompt's text
       embeddings, min-max scaled to ``[0, 1]`` over the image (all 0 when equal); quality
       ``w_i = exp(relevance * r_i)``; kernel ``L = diag(w) S diag(w)`` with ``S`` the tokens' cosine
       similarities; the DPP ranks tokens in greedy MAP order (:func:`~tokenreduce.core.greedy_dpp`).
    3. Intersection: both parts keep their first ``b`` tokens, ``b`` grown together until the two kept
       sets share ``keep`` tokens: a token enters the intersection at ``b = max(graph rank, DPP rank) +
       1``; of the tokens entering at the last ``b`` (when more enter than fit), those the other part
       ranks earlier go first, then the lower index. The kept tokens go to the LLM in original order.

    Choices the paper leaves open (ours): the way degree and mean similarity combine (their product),
    that both sides are scored and pruned alike, ``tau=0.7``, the query as the mean text embedding, the
    relevance scaling and ``relevance=3.0`` (the most relevant token's quality is ``e^3`` times the
    least's), the intersection's common budget ``b`` (the two parts' own budgets are not recorded) and
    its tie-breaking. Since prefixes of ``b`` tokens out of ``N`` share at least ``2b - N``, the DPP runs
    only ``ceil((N + keep) / 2)`` greedy steps. Budget: ``keep_ratio`` default 64/576 (a common setting
    of this literature; the paper's own is not recorded), or ``keep_tokens``; all scores in float32.
    """

    name = "script"
    paper = (
        "Script: Graph-Structured and Query-Conditioned Semantic Token Pruning for Multimodal Large Language Models, "
        "TMLR 2025, arXiv 2512.01949"
    )
    needs_text = True
    default_keep_ratio = 64 / 576

    tau: float = 0.7  # cosine similarity above which two tokens of opposite sides share an edge
    relevance: float = 3.0  # weight of the scaled text relevance in the DPP's quality, exp(relevance * r)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.tau = as_real("tau", self.tau, -1, 1)
        self.relevance = as_real("relevance", self.relevance, 0, None)

    def select(self, ctx: VisualContext) -> Selection:
        text, text_mask = ctx.prompt_text(self.name)
        m, n = ctx.features.shape[:2]
        unit = F.normalize(ctx.features.float(), dim=-1)
        sim = unit @ unit.transpose(1, 2)  # [M, N, N]

        side = torch.arange(n, device=sim.device) % 2
        edge = (sim > self.tau) & (side[:, None] != side[None, :])
        redundancy = (sim * edge).sum(dim=2)  # degree times mean edge similarity
        graph_rank = _ranks(redundancy.argsort(dim=1, stable=True))

        weights = text_mask[..., None].float()
        query = F.normalize((text.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1), dim=-1)
        rel = (unit @ query[..., None])[..., 0]  # [M, N]
        low, high = rel.amin(dim=1, keepdim=True), rel.amax(dim=1, keepdim=True)
        scaled = torch.where(high > low, (rel - low) / (high - low), torch.zeros_like(rel))
        quality = (self.relevance * scaled).exp()
        depth = math.ceil((n + ctx.keep) / 2)
        order = greedy_dpp(quality[:, :, None] * sim * quality[:, None, :], depth)
        dpp_rank = torch.full_like(graph_rank, n).scatter(1, order, torch.arange(depth, device=sim.device).expand(m, -1))

        enters = torch.maximum(graph_rank, dpp_rank) * (n + 1) + torch.minimum(graph_rank, dpp_rank)
        picked = enters.argsort(dim=1, stable=True)[:, : ctx.keep]
        return keep(picked.sort(dim=1).values, n)


def _ranks(order: torch.Tensor) -> torch.Tensor:
    """Each token's place ``[M, N]`` in ``order [M, N]`` (a permutation per row)."""
    places = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, places)
