"""Naive oracle of GlobalCom2 on one LLaVA-NeXT AnyRes image (Python loops and lists, written from
the spec, sharing no code with tokenreduce): which tokens of the image's packed span the LLM reads."""

from __future__ import annotations

import math


def span_layout(size: tuple[int, int], rows: int, cols: int, side: int) -> list[tuple]:
    """The packed span of an image of ``size`` (height, width) on a ``rows x cols`` crop grid:
    ``("base", y, x)`` for the thumbnail in raster order, then per unpadded row of the crops' grid its
    ``("crop", y, x)`` tokens (global coordinates) and one ``("newline",)`` (LLaVA-NeXT's unpadding)."""
    height, width = size
    grid_h, grid_w = rows * side, cols * side
    top, bottom, left, right = 0, grid_h, 0, grid_w
    if width / height > grid_w / grid_h:
        new_h = int(round(height * (grid_w / width), 7))
        pad = (grid_h - new_h) // 2
        top, bottom = pad, grid_h - pad
    else:
        new_w = int(round(width * (grid_h / height), 7))
        pad = (grid_w - new_w) // 2
        left, right = pad, grid_w - pad
    out = [("base", y, x) for y in range(side) for x in range(side)]
    for y in range(top, bottom):
        out += [("crop", y, x) for x in range(left, right)] + [("newline",)]
    return out


def _bilinear(grid: list[list[float]], out_h: int, out_w: int) -> list[list[float]]:
    """PyTorch's bilinear resize with align_corners=False, by hand."""
    in_h, in_w = len(grid), len(grid[0])

    def source(d: int, n_in: int, n_out: int) -> tuple[int, int, float]:
        s = max((d + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = int(s)
        i1 = i0 + 1 if i0 < n_in - 1 else i0
        return i0, i1, s - i0

    res = []
    for y in range(out_h):
        y0, y1, ly = source(y, in_h, out_h)
        line = []
        for x in range(out_w):
            x0, x1, lx = source(x, in_w, out_w)
            top = grid[y0][x0] * (1 - lx) + grid[y0][x1] * lx
            bottom = grid[y1][x0] * (1 - lx) + grid[y1][x1] * lx
            line.append(top * (1 - ly) + bottom * ly)
        res.append(line)
    return res


def _unit(values: list[float]) -> list[float]:
    norm = max(math.sqrt(sum(v * v for v in values)), 1e-12)
    return [v / norm for v in values]


def _top(scores: list[float], k: int) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])[:k]


def shares(weights: list[float], total: int, caps: list[int]) -> list[int]:
    """Integers proportional to ``weights`` summing to ``total``, none above its cap: capped parts
    are set aside and the rest shared again; floors, then one more to the largest remainders."""
    fixed = [c <= 0 for c in caps]
    while True:
        rest = total - sum(c for c, f in zip(caps, fixed) if f)
        wsum = sum(w for w, f in zip(weights, fixed) if not f)
        share = [float(c) if f else rest * w / wsum for w, c, f in zip(weights, caps, fixed)]
        over = [not f and s > c for s, c, f in zip(share, caps, fixed)]
        if not any(over):
            break
        fixed = [f or o for f, o in zip(fixed, over)]
    out = [min(int(math.floor(s)), c) for s, c in zip(share, caps)]
    order = sorted((i for i in range(len(caps)) if out[i] < caps[i]), key=lambda i: (-(share[i] - out[i]), i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def region_saliency(thumb: list[float], rows: int, cols: int, side: int) -> list[float]:
    """The thumbnail's class-token attention summed over each crop's region (row-major crops)."""
    bh, bw = max(side // rows, 1), max(side // cols, 1)
    summed = [0.0] * (rows * cols)
    for idx, a in enumerate(thumb):
        y, x = divmod(idx, side)
        summed[min(y // bh, rows - 1) * cols + min(x // bw, cols - 1)] += a
    return summed


def crop_members(layout: list[tuple], rows: int, cols: int, side: int) -> list[list[int]]:
    """The packed span's indices of each crop's tokens (row-major crops) after unpadding."""
    members = [[] for _ in range(rows * cols)]
    for i, t in enumerate(layout):
        if t[0] == "crop":
            members[(t[1] // side) * cols + t[2] // side].append(i)
    return members


def globalcom2_keep(
    cls: list[list[float]], size: tuple[int, int], rows: int, cols: int, side: int, r: float, temperature: float = 10.0
) -> tuple[list[int], list[int]]:
    """Kept span indices (ascending) and each crop's budget, from ``cls`` (per tower image, the base
    first then the crops row-major: the class token's attention to each of its ``side * side`` patches)."""
    layout = span_layout(size, rows, cols, side)
    thumb = cls[0]
    kept = [i for i, t in enumerate(layout) if t[0] == "newline"]
    k0 = min(side * side, max(1, round(r * side * side)))
    kept += _top(thumb, k0)  # base tokens are the span's first side*side
    # budgets: thumbnail attention summed over each crop's region, softmax(s / T)
    summed = region_saliency(thumb, rows, cols, side)
    top = max(summed)
    e = [math.exp((s - top) / temperature) for s in summed]
    p = [v / sum(e) for v in e]
    mean = sum(p) / len(p)
    members = crop_members(layout, rows, cols, side)
    counts = [len(m) for m in members]
    total = sum(counts)
    budget = shares([n * min(1.0, r * (1 + pi - mean)) for n, pi in zip(counts, p)], min(total, max(1, round(r * total))), counts)
    # within a crop: normalised own attention + normalised thumbnail attention resized to the unpadded grid
    crop_pos = [t for t in layout if t[0] == "crop"]
    y0, x0 = min(t[1] for t in crop_pos), min(t[2] for t in crop_pos)
    h, w = max(t[1] for t in crop_pos) - y0 + 1, max(t[2] for t in crop_pos) - x0 + 1
    guide = _bilinear([thumb[y * side : (y + 1) * side] for y in range(side)], h, w)
    for c, idx in enumerate(members):
        own = [cls[1 + c][(layout[i][1] % side) * side + layout[i][2] % side] for i in idx]
        glob = [guide[layout[i][1] - y0][layout[i][2] - x0] for i in idx]
        score = [a + b for a, b in zip(_unit(own), _unit(glob))]
        kept += [idx[j] for j in _top(score, budget[c])]
    return sorted(kept), budget
