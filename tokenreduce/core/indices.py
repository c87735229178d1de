"""Index tensors reused across forwards: the same ``arange`` (or grid partition) is asked for in every
block of every call."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T")
_MADE: dict[Hashable, object] = {}


def made_once(key: Hashable, device: torch.device, make: Callable[[], T]) -> T:
    """``make()`` (tensors on ``device``) made once per ``key`` and shared afterwards: read-only, never
    modify the result in place. Made afresh while ``torch.compile``/``torch.export`` trace (a cached
    tensor would become a graph constant), under a fake-tensor mode and on the meta device."""
    if device.type == "meta" or torch.compiler.is_compiling():
        return make()
    made = _MADE.get(key)
    if made is None:
        with torch.inference_mode(False), torch.no_grad():  # usable in and out of inference mode
            made = make()
        tensors = made if isinstance(made, tuple) else (made,)
        if any(isinstance(t, torch._subclasses.FakeTensor) for t in tensors):  # not real tensors to keep
            return made
        _MADE[key] = made
    return made  # type: ignore[return-value]


def span(start: int, stop: int | None = None, step: int = 1, device: torch.device | str = "cpu") -> Tensor:
    """``torch.arange(start, stop, step)`` on ``device`` (``span(n)``: ``0..n-1``), made once per
    arguments (:func:`made_once`)."""
    if stop is None:
        start, stop = 0, start
    device = torch.device(device)
    return made_once(("span", start, stop, step, device), device, lambda: torch.arange(start, stop, step, device=device))
