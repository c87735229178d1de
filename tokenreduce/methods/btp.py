"""``btp``: Balanced Token Pruning (Li et al., "Balanced Token Pruning: Accelerating Vision Language
Models Beyond Local Optimization", NeurIPS 2025, arXiv 2505.22038; paper only: the reference
``EmbodiedCity/NeurIPS2025-Balanced-Token-Pruning`` was not read), and the search of its stage layers
(``tokenreduce calibrate --vlm --method btp``)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from tokenreduce.core import Selection, keep, max_min_subset
from tokenreduce.methods.gsearch import Objective, depth_and_tokens, load_searched, stage_rates
from tokenreduce.methods.llm import AttentionRankPrune, LLMContext, check_stages, stage_layers
from tokenreduce.registry import register_method
from tokenreduce.validate import as_int, as_real

PAPER = "Li et al., Balanced Token Pruning: Accelerating Vision Language Models Beyond Local Optimization, NeurIPS 2025"


@register_method
@dataclass
class BTP(AttentionRankPrune):
    """At the input of each stage layer ``layers[j]`` keep ``ratios[j]`` of each image's visual tokens
    (a share of those it had at the LLM's input, ``max(1, round(ratio * n))``), chosen among the tokens
    the previous stage kept: by **diversity** in the first ``diversity_stages`` stages, by **attention**
    in the later ones.

    The paper's rule as we have it (the abstract and the spec's summary; the full text not read): "a
    small calibration set splits pruning into stages: early stages weigh the effect on later layers
    (diversity), deep stages local output consistency (attention)". Choices it leaves open, ours:

    - diversity: the greedy max-min (k-center) subset of the stage layer's input hidden states under
      cosine distance (core ``max_min_subset``, DivPrune's rule: start at the token farthest from its
      nearest neighbour, ties to the lowest index), in float32;
    - attention: the last prompt token's attention at the stage layer itself (its own queries and keys,
      softmax, mean over heads), PyramidDrop's rule;
    - ``diversity_stages`` defaults to ``len(ratios) // 2`` (the shallower half of the stages, the
      middle one going to attention);
    - ``ratios`` default to PyramidDrop's ``(0.5, 0.25, 0.125)`` (the paper reports "78% compression,
      96.7% of performance on average"; its per-stage ratios are not in the text we have);
    - ``layers``: from ``schedule``, a file written by ``tokenreduce calibrate --vlm --method btp``
      (:func:`btp_search`: per stage, the shallowest layer whose pruning keeps the last token's logits
      within a tolerance, measured at the output, so the effect on every later layer counts), or given,
      or by default PyramidDrop's ends scaled to the depth (``(j + 1) * depth // (len(ratios) + 1)``);
    - kept tokens keep their positions (``positions="keep"``); each image of a prompt keeps the same
      share.

    Not implemented (the summary marks them unverified): the spatial initialisation and attention
    rebalancing.
    """

    name = "btp"
    paper = PAPER
    scores_from = "own"

    layers: Sequence[int] | None = None
    ratios: Sequence[float] = (0.5, 0.25, 0.125)
    diversity_stages: int | None = None  # stages ranked by diversity (the first ones); default len(ratios) // 2
    schedule: str | os.PathLike | None = None  # a `tokenreduce calibrate --vlm --method btp` file
    positions: str = "keep"

    def __post_init__(self) -> None:
        if self.schedule is not None:
            load_searched(self, self.schedule, ("layers", "ratios", "diversity_stages"))
        self.ratios, self.layers = check_stages(self.ratios, self.layers)
        if self.diversity_stages is None:
            self.diversity_stages = len(self.ratios) // 2
        self.diversity_stages = as_int("diversity_stages", self.diversity_stages, 0, len(self.ratios))
        self.check_positions()

    def prune_layers(self, depth: int) -> tuple[int, ...]:
        return stage_layers(self.layers, len(self.ratios), depth)

    def kept(self, tokens: int, stage: int) -> int:
        return self.kept_count(tokens, self.ratios[stage])

    def select(self, ctx: LLMContext) -> list[Selection]:
        if ctx.stage >= self.diversity_stages:
            return super().select(ctx)
        out = []
        for span, k in zip(ctx.spans, ctx.keep):
            tokens = ctx.hidden[span.row, span.start : span.start + span.length].float()
            out.append(keep(max_min_subset(tokens[None], k).sort(dim=1).values, span.length))
        return out


def btp_search(
    model: nn.Module,
    batches: Sequence[dict],
    tolerance: float,
    ratios: Sequence[float] = (0.5, 0.25, 0.125),
    diversity_stages: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """BTP's stage layers from a calibration set: stage by stage, shallow to deep, with the earlier
    stages fixed (and no later ones), the shallowest layer (after the previous stage's, leaving room
    for the stages after it) whose pruning keeps the degradation (:class:`~tokenreduce.methods.gsearch.Objective`:
    the mean relative change of the last prompt token's logits against the unpruned model) within
    ``tolerance``; where no layer does, the one of least degradation (the shallower on a tie).
    Deterministic: the same batches give the same layers.

    Returns the dict ``tokenreduce calibrate`` writes: ``layers``, ``ratios``, ``diversity_stages``,
    ``rates`` (the keep rate of every LLM layer), ``degradation`` (all stages), ``tolerance``,
    ``tokens``, ``prompts``, ``forwards`` and ``seconds``.
    """
    tolerance = as_real("tolerance", tolerance, 0, None)
    full = BTP(ratios=ratios, diversity_stages=diversity_stages)  # validates the arguments
    ratios, stages = full.ratios, len(full.ratios)
    began = time.perf_counter()
    depth, n = depth_and_tokens(model, batches)
    stage_layers(None, stages, depth)  # raises when the stages do not fit
    objective = Objective(model, batches)
    layers: list[int] = []
    for j in range(stages):
        first = layers[-1] + 1 if layers else 1
        best = None
        for layer in range(first, depth - (stages - 1 - j)):
            trial = BTP(layers=[*layers, layer], ratios=ratios[: j + 1], diversity_stages=min(full.diversity_stages, j + 1))
            value = objective(trial)
            if best is None or value < best[1]:
                best = (layer, value)
            if value <= tolerance:
                best = (layer, value)
                break
        layers.append(best[0])
        if progress is not None:
            progress(1)
    final = objective(BTP(layers=layers, ratios=ratios, diversity_stages=full.diversity_stages))
    rates = stage_rates(layers, ratios, depth)
    return dict(
        method="btp",
        layers=layers,
        ratios=list(ratios),
        diversity_stages=full.diversity_stages,
        rates=rates,
        degradation=final,
        tolerance=tolerance,
        tokens=n,
        **objective.cost(began),
    )
