"""``gsearch`` and ``psigmoid``: in-LLM pruning on a per-layer keep schedule (Zhao et al., "Accelerating
Multimodal Large Language Models by Searching Optimal Vision Token Reduction", CVPR 2025, arXiv
2412.00556; paper only), and the searches that fit the schedules (``tokenreduce calibrate --vlm``)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tokenreduce.methods.llm import AttentionRankPrune, LLMMethod, fraction
from tokenreduce.registry import register_method
from tokenreduce.validate import as_real, as_sequence, read_json_file

FORMAT = "tokenreduce-llm-schedule"  # the "format" field of the files `tokenreduce calibrate --vlm` writes
Schedule = str | os.PathLike | Sequence[float]


def read_schedule(path: str | os.PathLike) -> dict:
    """The content of a schedule file written by ``tokenreduce calibrate --vlm`` (``rates``: one keep
    rate per LLM layer; P-Sigmoid's also ``slope`` and ``midpoint``)."""
    data = read_json_file(path, "schedule file")
    if not isinstance(data, dict) or data.get("format") != FORMAT or "rates" not in data:
        raise ValueError(f"schedule file {str(path)!r} was not written by `tokenreduce calibrate --vlm` (no {FORMAT!r} format)")
    return data


def read_method_schedule(path: str | os.PathLike, method: str) -> dict:
    """:func:`read_schedule` of a file that ``tokenreduce calibrate --vlm --method <method>`` wrote."""
    data = read_schedule(path)
    if data.get("method") != method:
        raise ValueError(
            f"schedule file {str(path)!r} holds a {data.get('method')!r} schedule, not a {method} one "
            "(use it with gsearch, which takes any schedule file)"
        )
    return data


def load_searched(method: object, path: str | os.PathLike, names: Sequence[str]) -> None:
    """Set ``method``'s fields ``names`` from the schedule file at ``path`` that its own calibration wrote;
    a field also passed with a value other than its default raises rather than being overwritten."""
    defaults = {f.name: f.default for f in dataclasses.fields(method)}  # type: ignore[arg-type]
    for name in names:
        if getattr(method, name) != defaults[name]:
            raise ValueError(f"pass {name} or schedule (a file that holds it), not both")
    data = read_method_schedule(path, method.name)  # type: ignore[attr-defined]
    for name in names:
        setattr(method, name, data[name])


def write_schedule(path: str | os.PathLike, result: dict) -> None:
    """Write a search's result (plus any fields added to it) as JSON."""
    with open(path, "w") as f:
        json.dump({"format": FORMAT, **result}, f, indent=2)


def check_rates(name: str, values: object) -> tuple[float, ...]:
    """Keep rates, one per LLM layer: fractions in (0, 1], 1 at layer 0, non-increasing."""
    items = as_sequence(name, values, "keep rates in (0, 1], one per LLM layer")
    rates = tuple(fraction(f"{name}[{i}]", v) for i, v in enumerate(items))
    if not rates or rates[0] != 1 or any(b > a for a, b in zip(rates, rates[1:])):
        raise ValueError(
            f"{name} must be non-increasing keep rates in (0, 1], one per LLM layer, starting at 1 (layer 0 keeps "
            f"every token), got {rates}"
        )
    return rates


def sigmoid_rates(slope: float, midpoint: float, depth: int) -> tuple[float, ...]:
    """P-Sigmoid's keep rate of each of ``depth`` layers: ``1 / (1 + exp(slope * (x - midpoint)))`` at
    relative depth ``x = l / (depth - 1)``, and 1 at layer 0."""
    exponents = (min(700.0, slope * (layer / (depth - 1) - midpoint)) for layer in range(1, depth))  # exp() < inf
    return (1.0, *(1 / (1 + math.exp(z)) for z in exponents))


@dataclass
class ScheduledPrune(AttentionRankPrune):
    """Before every layer whose keep rate falls below the previous layer's, keep that rate's share of
    each image's tokens (of those it had at the LLM's input, ``max(1, round(rate * n))``), ranked by
    the attention of the last prompt token at that layer (its own queries and keys, mean over heads,
    as PyramidDrop scores), among the tokens the earlier layers kept."""

    scores_from = "own"
    positions: str = "keep"

    @abstractmethod
    def rates(self, depth: int) -> tuple[float, ...]:
        """The keep rate of each of the LLM's ``depth`` layers."""

    def prune_layers(self, depth: int) -> tuple[int, ...]:
        rates = self.rates(depth)
        layers = tuple(layer for layer in range(1, depth) if rates[layer] < rates[layer - 1])
        self._stage_rates = tuple(rates[layer] for layer in layers)  # for kept(), which is given no depth
        return layers

    def kept(self, tokens: int, stage: int) -> int:
        return self.kept_count(tokens, self._stage_rates[stage])


@register_method
@dataclass
class GSearch(ScheduledPrune):
    """G-Search's schedule: keep rate ``schedule[l]`` of each image's visual tokens from LLM layer ``l``
    on, ranked by attention at each layer where the rate drops (see :class:`ScheduledPrune`).

    The paper (no code; its abstract's wording, the full text not read): "the ranking of each vision token
    sorted by its attention score is similar in each layer except the first layer"; a greedy search
    (G-Search) finds "the least number of vision tokens to keep at each layer from the shallow to the
    deep". ``schedule`` is a file written by ``tokenreduce calibrate --vlm --method gsearch``
    (:func:`g_search`) or the rates as a list. Choices the paper leaves open: the ranking is the last
    prompt token's attention at the pruning layer itself (PyramidDrop's rule; one layer's attention, as
    the paper's observation allows), and ranking starts at layer 1 (layer 0 always keeps everything: the
    paper's first-layer exception); each image of a prompt keeps the same rate; kept tokens keep their
    positions (``positions="keep"``, FastV's, the paper's baseline); at least one token per image stays.
    """

    name = "gsearch"
    paper = "Zhao et al., Accelerating Multimodal Large Language Models by Searching Optimal Vision Token Reduction, CVPR 2025"

    schedule: Schedule | None = None  # a `tokenreduce calibrate --vlm` file, or one keep rate per LLM layer

    def __post_init__(self) -> None:
        if isinstance(self.schedule, (str, os.PathLike)):
            self.schedule = check_rates(f"schedule in {str(self.schedule)!r}", read_schedule(self.schedule)["rates"])
        elif self.schedule is not None:
            self.schedule = check_rates("schedule", self.schedule)
        self.check_positions()

    def rates(self, depth: int) -> tuple[float, ...]:
        if self.schedule is None:
            raise ValueError(
                "gsearch has no schedule: pass schedule='file.json' from `tokenreduce calibrate --vlm --method gsearch` "
                "or one keep rate per LLM layer"
            )
        if len(self.schedule) != depth:
            raise ValueError(f"schedule must have one keep rate per LLM layer ({depth}), got {len(self.schedule)}")
        return self.schedule


@register_method
@dataclass
class PSigmoid(ScheduledPrune):
    """P-Sigmoid's schedule: keep rate ``1 / (1 + exp(slope * (l / (depth - 1) - midpoint)))`` at LLM
    layer ``l >= 1`` (1 at layer 0), ranked by attention at every layer (see :class:`ScheduledPrune`).

    The paper (no code; its abstract's wording): a "parametric sigmoid function (P-Sigmoid)" guides the
    reduction at each layer, "whose parameters are optimized by Bayesian Optimization" for a budget.
    ``schedule`` is a file written by ``tokenreduce calibrate --vlm --method psigmoid`` (:func:`p_sigmoid_search`): its
    ``slope`` and ``midpoint`` replace the arguments. Choices the paper leaves open: the two parameters are
    the slope and the midpoint over relative depth (so a schedule moves between depths); the budget is the
    mean keep rate over layers; the defaults (``slope=12``, ``midpoint=0.5``) keep about half the
    visual-token work; ranking, positions and the first layer as for :class:`GSearch`.
    """

    name = "psigmoid"
    paper = GSearch.paper

    slope: float = 12.0  # > 0: how sharply the rate falls around the midpoint
    midpoint: float = 0.5  # relative depth where the rate is 1/2
    schedule: str | os.PathLike | None = None  # a `tokenreduce calibrate --vlm --method psigmoid` file

    def __post_init__(self) -> None:
        if self.schedule is not None:
            data = read_method_schedule(self.schedule, "psigmoid")
            self.slope, self.midpoint = data["slope"], data["midpoint"]
        self.slope = as_real("slope", self.slope, 0, None, low_open=True)
        self.midpoint = as_real("midpoint", self.midpoint, -10, 10)
        self.check_positions()

    def rates(self, depth: int) -> tuple[float, ...]:
        return sigmoid_rates(self.slope, self.midpoint, depth)


# -- the searches ------------------------------------------------------------------------------------


def last_logits(model: nn.Module, inputs: dict) -> Tensor:
    """``[B, V]`` each prompt's next-token logits (prompts unpadded or left-padded)."""
    with torch.no_grad():
        return model(**inputs, logits_to_keep=1).logits[:, -1].float()


def stage_rates(layers: Sequence[int], ratios: Sequence[float], depth: int) -> list[float]:
    """The keep rate at each of ``depth`` LLM layers of stages that keep ``ratios[j]`` from ``layers[j]`` on."""
    rates = [1.0] * depth
    for layer, ratio in zip(layers, ratios):
        rates[layer:] = [ratio] * (depth - layer)
    return rates


class Objective:
    """The searches' degradation of a method (a schedule, BTP's stages) on calibration batches: the mean over prompts of the
    relative change of the last prompt token's logits, ``||z - z0|| / ||z0||``, against the unpruned
    model; counts the forward passes."""

    def __init__(self, model: nn.Module, batches: Sequence[dict]) -> None:
        import tokenreduce

        if not batches:
            raise ValueError("calibration needs at least one batch of prompts")
        if tokenreduce.is_patched(model):
            raise ValueError("calibrate an unpatched model: the reference is its unpruned output (tokenreduce.remove it first)")
        self.model, self.batches = model, list(batches)
        self.reference = [last_logits(model, b) for b in self.batches]
        self.forwards = len(self.batches)
        self.prompts = sum(r.shape[0] for r in self.reference)

    def cost(self, began: float) -> dict:
        """What a search that started at ``perf_counter()`` time ``began`` cost, for its result file."""
        return dict(prompts=self.prompts, forwards=self.forwards, seconds=round(time.perf_counter() - began, 3))

    def __call__(self, method: LLMMethod) -> float:
        import tokenreduce

        tokenreduce.apply(self.model, method)
        try:
            total = 0.0
            for inputs, want in zip(self.batches, self.reference):
                got = last_logits(self.model, inputs)
                total += float(((got - want).norm(dim=-1) / want.norm(dim=-1).clamp(min=1e-12)).sum())
                self.forwards += 1
        finally:
            tokenreduce.remove(self.model)
        return total / self.prompts


def depth_and_tokens(model: nn.Module, batches: Sequence[dict]) -> tuple[int, int]:
    """The LLM's depth and the visual tokens of the calibration's first image."""
    from tokenreduce.adapters import locate

    _, inner, adapter = locate(model)
    depth = len(getattr(inner, adapter.spec(inner).text).layers)
    image = int(getattr(inner.config, adapter.spec(inner).image_token))
    ids = batches[0]["input_ids"][0]
    return depth, int((ids == image).sum())


def g_search(model: nn.Module, batches: Sequence[dict], tolerance: float, progress: Callable[[int], None] | None = None) -> dict:
    """G-Search: for each LLM layer from 1 (shallow) to the last, with the earlier layers' counts fixed
    and the deeper layers keeping what this one keeps, the least visual-token count (of the ``n`` of the
    first calibration image) whose degradation (:class:`Objective`) stays within ``tolerance``. The
    least count is found by bisection between 1 and the previous layer's count (which is known to be
    within tolerance), assuming degradation does not grow with the count. Deterministic: the same
    batches give the same schedule.

    Returns the dict ``tokenreduce calibrate`` writes: ``rates``, ``counts``, ``degradation``,
    ``tolerance``, ``tokens``, ``prompts``, ``forwards`` and ``seconds``.
    """
    tolerance = as_real("tolerance", tolerance, 0, None)
    began = time.perf_counter()
    objective = Objective(model, batches)
    depth, n = depth_and_tokens(model, batches)
    counts = [n] * depth
    for layer in range(1, depth):
        low, high = 1, counts[layer - 1]
        while low < high:
            mid = (low + high) // 2
            trial = counts[:layer] + [mid] * (depth - layer)
            if objective(GSearch(schedule=[c / n for c in trial])) <= tolerance:
                high = mid
            else:
                low = mid + 1
        counts[layer:] = [high] * (depth - layer)
        if progress is not None:
            progress(1)
    rates = [c / n for c in counts]
    final = objective(GSearch(schedule=rates))
    return dict(
        method="gsearch",
        rates=rates,
        counts=counts,
        degradation=final,
        tolerance=tolerance,
        tokens=n,
        mean_rate=sum(rates) / depth,
        **objective.cost(began),
    )


def budget_midpoint(slope: float, budget: float, depth: int) -> float | None:
    """The midpoint whose sigmoid schedule has mean keep rate ``budget`` over the ``depth`` layers, by
    bisection in [-10, 10] (the mean grows with the midpoint); ``None`` when no midpoint there meets it."""
    low, high = -10.0, 10.0

    def mean(m: float) -> float:
        return sum(sigmoid_rates(slope, m, depth)) / depth

    if not mean(low) <= budget <= mean(high):
        return None
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if mean(mid) < budget else (low, mid)
    return (low + high) / 2


def p_sigmoid_search(
    model: nn.Module,
    batches: Sequence[dict],
    budget: float,
    trials: int = 12,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """P-Sigmoid's fit for a ``budget`` (the mean keep rate over the LLM's layers, layer 0's 1
    included): ``trials`` slopes drawn log-uniformly in [1, 64] by a generator seeded with ``seed``, each
    with the midpoint that meets the budget (:func:`budget_midpoint`); the pair of least degradation
    (:class:`Objective`) wins, the earlier on a tie. The paper fits both parameters by Bayesian
    optimisation; the budget fixes one, and a seeded random search over the other stands in for it.

    Returns the dict ``tokenreduce calibrate`` writes: ``slope``, ``midpoint``, ``rates``,
    ``degradation``, ``budget``, the ``trials`` tried, ``prompts``, ``forwards`` and ``seconds``.
    """
    from tokenreduce.validate import as_int

    trials, seed = as_int("trials", trials, 1), as_int("seed", seed)
    began = time.perf_counter()
    depth, _ = depth_and_tokens(model, batches)
    budget = as_real("budget", budget, 1 / depth, 1, low_open=True, high_open=True)
    generator = torch.Generator().manual_seed(seed)
    slopes = torch.exp(torch.rand(trials, generator=generator, dtype=torch.float64) * math.log(64)).tolist()
    objective = Objective(model, batches)
    tried, best = [], None
    for slope in slopes:
        midpoint = budget_midpoint(slope, budget, depth)
        if midpoint is not None:
            value = objective(PSigmoid(slope=slope, midpoint=midpoint))
            tried.append(dict(slope=slope, midpoint=midpoint, degradation=value))
            if best is None or value < best["degradation"]:
                best = tried[-1]
        if progress is not None:
            progress(1)
    if best is None:
        raise ValueError(f"no sigmoid of the {trials} slopes tried meets budget {budget} on {depth} layers; pass more trials")
    return dict(
        method="psigmoid",
        slope=best["slope"],
        midpoint=best["midpoint"],
        rates=list(sigmoid_rates(best["slope"], best["midpoint"], depth)),
        degradation=best["degradation"],
        budget=budget,
        seed=seed,
        trials=tried,
        **objective.cost(began),
    )
