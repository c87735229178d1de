"""``vflowopt``: VFlowOpt (Yang et al., "VFlowOpt: A Token Pruning Framework for LMMs with Visual
Information Flow-Guided Optimization", ICCV 2025, arXiv 2508.05211; paper only: the reference
``sihany077/VFlowOpt`` was not read), and the search of its hyper-parameters (``tokenreduce calibrate
--vlm --method vflowopt``)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tokenreduce.core import Selection, keep, merge_into_nearest, weighted_mean_coeff
from tokenreduce.methods.gsearch import Objective, depth_and_tokens, load_searched, stage_rates
from tokenreduce.methods.llm import LLMContext, LLMMethod, check_stages, stage_layers
from tokenreduce.registry import register_method
from tokenreduce.validate import as_bool, as_int, as_real

PAPER = "Yang et al., VFlowOpt: A Token Pruning Framework for LMMs with Visual Information Flow-Guided Optimization, ICCV 2025"
ALPHAS = (0.1, 10.0)  # the range the search draws the entropy exponent from (log-uniform)


def feature_entropy(x: Tensor) -> Tensor:
    """``[..., N]`` the Shannon entropy (nats) of ``softmax`` over the features of each token of ``x [..., N, D]``, in float32."""
    logp = x.float().log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


@register_method
@dataclass
class VFlowOpt(LLMMethod):
    """At each stage layer ``layers[j]`` keep ``ratios[j]`` of each image's visual tokens (a share of
    those it had at the LLM's input, ``max(1, round(ratio * n))``) among those the previous stage
    left, ranked by ``relevance * entropy ** alpha``; with ``recycle`` each dropped token is averaged
    into the kept token it is most similar to instead of being lost.

    The paper's rule as we have it (the abstract and the spec's summary; the full text not read):
    "importance = attention context relevance × patch entropy; progressive pruning with recycling;
    hyper-parameters searched per model offline by minimising the last token's representation change";
    "prune 90%". Choices it leaves open, ours:

    - context relevance: the last prompt token's attention at the stage layer itself (its own queries
      and keys, softmax, mean over heads), PyramidDrop's rule;
    - patch entropy: the Shannon entropy of the softmax over the features of the token's hidden state
      at the stage layer's input (the in-LLM stage sees no pixels, so the entropy of the image patch
      itself is not available here), raised to ``alpha`` (``alpha=1``: the plain product);
    - progressive: ``ratios`` default ``(0.5, 0.25, 0.1)``, the last one the paper's "prune 90%";
      ``layers`` default PyramidDrop's ends scaled to the depth (``(j + 1) * depth // (len(ratios) + 1)``);
    - recycling: each dropped token joins the kept token of highest cosine similarity of their hidden
      states, the kept token becoming the plain mean of its group at its own position (core
      ``merge_into_nearest``); ties to the lowest index;
    - the searched hyper-parameters: ``alpha`` and the stage layers, from ``schedule``, a file written
      by ``tokenreduce calibrate --vlm --method vflowopt`` (:func:`vflowopt_search`: a seeded random
      search minimising the relative change of the last token's **logits**, the engine's objective,
      for the paper's representation change);
    - kept tokens keep their positions (``positions="keep"``).
    """

    name = "vflowopt"
    paper = PAPER
    scores_from = "own"

    layers: Sequence[int] | None = None
    ratios: Sequence[float] = (0.5, 0.25, 0.1)
    alpha: float = 1.0  # the exponent of the entropy in the importance
    recycle: bool = True  # average dropped tokens into their most similar kept one
    schedule: str | os.PathLike | None = None  # a `tokenreduce calibrate --vlm --method vflowopt` file
    positions: str = "keep"

    def __post_init__(self) -> None:
        if self.schedule is not None:
            load_searched(self, self.schedule, ("layers", "ratios", "alpha"))
        self.ratios, self.layers = check_stages(self.ratios, self.layers)
        self.alpha = as_real("alpha", self.alpha, 0, 100)
        self.recycle = as_bool("recycle", self.recycle)
        self.check_positions()

    def prune_layers(self, depth: int) -> tuple[int, ...]:
        return stage_layers(self.layers, len(self.ratios), depth)

    def kept(self, tokens: int, stage: int) -> int:
        return min(tokens, max(1, round(self.ratios[stage] * tokens)))

    def select(self, ctx: LLMContext) -> list[Selection]:
        assert ctx.attention is not None
        out = []
        for span, k in zip(ctx.spans, ctx.keep):
            states = ctx.hidden[span.row, span.start : span.start + span.length]
            relevance = ctx.attention[span.row, span.start : span.start + span.length].float()
            importance = relevance * feature_entropy(states) ** self.alpha
            kept = importance.topk(k).indices.sort().values[None]
            if not self.recycle or k == span.length:
                out.append(keep(kept, span.length))
                continue
            dropped = torch.ones(span.length, dtype=torch.bool, device=kept.device).scatter(0, kept[0], False)
            slot, _ = merge_into_nearest(states[None], kept, dropped.nonzero().T, span.length)
            out.append(Selection(slot, kept, weighted_mean_coeff(slot, torch.ones_like(slot, dtype=torch.float), k)))
        return out


def vflowopt_search(
    model: nn.Module,
    batches: Sequence[dict],
    trials: int = 12,
    seed: int = 0,
    ratios: Sequence[float] = (0.5, 0.25, 0.1),
    progress: Callable[[int], None] | None = None,
) -> dict:
    """VFlowOpt's per-model hyper-parameters for fixed ``ratios``: ``trials`` draws, from a generator
    seeded with ``seed``, of the entropy exponent ``alpha`` (log-uniform in [0.1, 10]) and of the
    stage layers (distinct layers in ``[1, depth - 1]``, sorted, uniformly); the draw of least
    degradation (:class:`~tokenreduce.methods.gsearch.Objective`, the mean relative change of the last
    prompt token's logits against the unpruned model) wins, the earlier on a tie. The paper's search
    method is not in the text we have; a seeded random search stands in for it.

    Returns the dict ``tokenreduce calibrate`` writes: ``layers``, ``ratios``, ``alpha``, ``rates``
    (the keep rate of every LLM layer), ``degradation``, the ``trials`` tried, ``seed``, ``tokens``,
    ``prompts``, ``forwards`` and ``seconds``.
    """
    trials, seed = as_int("trials", trials, 1), as_int("seed", seed)
    ratios = VFlowOpt(ratios=ratios).ratios  # validates them
    began = time.perf_counter()
    depth, n = depth_and_tokens(model, batches)
    stage_layers(None, len(ratios), depth)  # raises when the stages do not fit
    generator = torch.Generator().manual_seed(seed)
    objective = Objective(model, batches)
    tried, best = [], None
    low, high = (math.log(a) for a in ALPHAS)
    for _ in range(trials):
        alpha = math.exp(low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64)))
        layers = sorted((torch.randperm(depth - 1, generator=generator)[: len(ratios)] + 1).tolist())
        value = objective(VFlowOpt(layers=layers, ratios=ratios, alpha=alpha))
        tried.append(dict(layers=layers, alpha=alpha, degradation=value))
        if best is None or value < best["degradation"]:
            best = tried[-1]
        if progress is not None:
            progress(1)
    rates = stage_rates(best["layers"], ratios, depth)
    return dict(
        method="vflowopt",
        layers=best["layers"],
        ratios=list(ratios),
        alpha=best["alpha"],
        rates=rates,
        degradation=best["degradation"],
        seed=seed,
        trials=tried,
        tokens=n,
        **objective.cost(began),
    )
