"""VScan's scans and merge written from the spec with Python loops, sharing no code with the method."""

from __future__ import annotations

import torch


def scan_and_merge(
    shallow: list[float], deep: list[float], states: torch.Tensor, grid: int, window: int, tokens: int, global_share: float
) -> tuple[list[int], torch.Tensor]:
    """``shallow``/``deep``: the class token's attention to each patch (mean over heads) at the shallow
    layer and the read layer; ``states [N, C]`` the patches at the read layer, on a ``grid x grid``
    grid. Local: in each ``window x window`` window (row-major), the top ``int(tokens * (1 -
    global_share)) // windows`` by ``shallow``; global: the top ``tokens - int(tokens * (1 -
    global_share))`` others by ``deep``. Every other patch joins the kept one it is most cosine-similar
    to; an output is the mean of its kept patch and those joining it. Returns (kept, outputs)."""
    per_side = grid // window
    local_total = int(tokens * (1 - global_share))
    per_window = local_total // (per_side * per_side)
    picked = []
    for wi in range(per_side):
        for wj in range(per_side):
            cells = [(wi * window + y) * grid + wj * window + x for y in range(window) for x in range(window)]
            picked += sorted(cells, key=lambda c: -shallow[c])[:per_window]
    others = [c for c in range(grid * grid) if c not in picked]
    picked += sorted(others, key=lambda c: -deep[c])[: tokens - local_total]
    picked.sort()
    groups = {p: [states[p]] for p in picked}
    for c in range(grid * grid):
        if c in picked:
            continue
        sims = [float(torch.nn.functional.cosine_similarity(states[c], states[p], dim=0)) for p in picked]
        groups[picked[sims.index(max(sims))]].append(states[c])
    return picked, torch.stack([torch.stack(groups[p]).mean(0) for p in picked])
