"""Presets of the bench: every encoder method at matched compute, found on the analytic MAC model.

The literature compares token reduction methods at equal GFLOPs (DeiT-S at about 2.9 G of its 4.6 G,
63%). Each method declares its :class:`~tokenreduce.methods.base.Budget` knob; a bisection on that knob
finds the config whose planned schedule comes closest to the target, without running the model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

import tokenreduce
from tokenreduce.adapters import locate
from tokenreduce.bench.flops import model_macs
from tokenreduce.bench.runner import MethodSpec
from tokenreduce.methods.base import EncoderMethod
from tokenreduce.registry import method_classes, method_names
from tokenreduce.stages import Stage
from tokenreduce.validate import as_real

# DeiT-S: DiffRate's 2.9 G schedule of 4.6 G, the point most ViT token-reduction papers report.
DEFAULT_FRACTION = 0.63
_STEPS = 40  # bisection steps on a real-valued knob: far below any schedule's resolution


@dataclass(frozen=True)
class Matched:
    """A method's config at matched compute, and the share of the unreduced MACs it plans."""

    spec: MethodSpec
    fraction: float


def input_tokens(model: nn.Module, img_size: int) -> int:
    """Tokens entering the first block of ``model`` for ``img_size`` px images (one dry forward)."""
    probe = tokenreduce.apply(copy.deepcopy(model).eval(), "none")
    with torch.inference_mode():
        probe(torch.zeros(1, 3, img_size, img_size, dtype=next(probe.parameters()).dtype))
    return tokenreduce.record(probe).input_tokens


def match_flops(
    model: nn.Module, fraction: float = DEFAULT_FRACTION, img_size: int = 224, methods: Sequence[str] | None = None
) -> list[Matched]:
    """Every encoder method with a budget knob (or those named in ``methods``) at the config whose
    planned MACs on ``model`` come closest to ``fraction`` of the unreduced ones, and the methods without
    a knob (DiffRate's searched schedules) whose default plans within 0.05 of it. Methods that cannot
    reach the target are skipped."""
    fraction = as_real("fraction", fraction, 0, 1, low_open=True)
    _, target, adapter = locate(model)
    n0 = input_tokens(model, img_size)
    prefix, depth = adapter.num_prefix_tokens(target), len(adapter.blocks(target))
    full = model_macs(adapter, target, n0, [n0] * depth)
    names = [n for n in method_names() if Stage.ENCODER in method_classes(n)] if methods is None else list(methods)

    def share(cls: type[EncoderMethod], value: float | None) -> float | None:
        try:
            method = cls() if value is None else cls(**{cls.budget.param: value})
            adapter.validate(target, method)
            plan = method.schedule(n0, prefix, depth)
        except (ValueError, TypeError):
            return None
        return model_macs(adapter, target, n0, plan, method.hook) / full

    out = []
    for name in names:
        cls = method_classes(name)[Stage.ENCODER]
        budget = cls.budget
        if budget is None:  # no knob (a searched schedule): in the comparison when its default lands there
            got = share(cls, None)
            if name != "none" and got is not None and abs(got - fraction) <= 0.05:
                out.append(Matched(MethodSpec(name), got))
            continue
        lo, hi = budget.low, budget.high
        best: tuple[float, float] | None = None  # (distance to the goal, value)
        for _ in range(_STEPS):
            mid = (lo + hi) // 2 if budget.integer else (lo + hi) / 2
            got = share(cls, mid)
            if got is not None and (best is None or abs(got - fraction) < best[0]):
                best = (abs(got - fraction), mid)
            # infeasible knobs sit at the aggressive end: move toward keeping more
            more = got is None or got < fraction
            if more == budget.increasing:
                lo = mid
            else:
                hi = mid
            if budget.integer and hi - lo <= 1:
                for end in (lo, hi):
                    got = share(cls, end)
                    if got is not None and (best is None or abs(got - fraction) < best[0]):
                        best = (abs(got - fraction), end)
                break
        if best is None:
            continue
        value = int(best[1]) if budget.integer else round(best[1], 4)
        got = share(cls, value)
        if got is not None and abs(got - fraction) <= 0.05:
            out.append(Matched(MethodSpec(name, {budget.param: value}), got))
    return out
