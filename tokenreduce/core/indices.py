"""Index rows reused across forwards: the same ``arange`` is asked for in every block of every call."""

from __future__ import annotations

import torch
from torch import Tensor

_ROWS: dict[tuple[int, int, int, torch.device], Tensor] = {}


def span(start: int, stop: int | None = None, step: int = 1, device: torch.device | str = "cpu") -> Tensor:
    """``torch.arange(start, stop, step)`` on ``device`` (``span(n)``: ``0..n-1``), made once per
    arguments and shared afterwards: read-only, never modify the result in place. Made afresh while
    ``torch.compile``/``torch.export`` trace (a cached tensor would become a graph constant) and on the
    meta device."""
    if stop is None:
        start, stop = 0, start
    device = torch.device(device)
    if device.type == "meta" or torch.compiler.is_compiling():
        return torch.arange(start, stop, step, device=device)
    key = (start, stop, step, device)
    rows = _ROWS.get(key)
    if rows is None:
        with torch.inference_mode(False), torch.no_grad():  # usable in and out of inference mode
            rows = torch.arange(start, stop, step, device=device)
        if isinstance(rows, torch._subclasses.FakeTensor):  # under a fake mode: not a real tensor to keep
            return rows
        _ROWS[key] = rows
    return rows
