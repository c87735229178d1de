"""CAT Pruning's choice of tokens written from the spec with Python loops and lists, sharing no code with
tokenreduce: the oracle the method must match on given denoiser outputs.

One image: ``noises[s]`` is its guiding noise at step ``s`` as ``[N][D]`` lists (token rows of the
output, see :func:`tokens`). Steps 0 .. stop_idx + 2 are computed in full; the noise of step stop_idx + 1
is the reference; the noise of step stop_idx + 2 is clustered and gives the first choice; every later
step's choice follows from the step before."""

from __future__ import annotations

import math

import torch


def tokens(output, grid: tuple[int, int]) -> list[list[float]]:
    """One image's output ``[C, H, W]`` (a tensor or nested lists) as token rows: token ``(r, c)`` holds
    its ``p x q`` patch in (y, x, channel) order."""
    rows, cols = grid
    values = output.tolist() if hasattr(output, "tolist") else output
    channels, height, width = len(values), len(values[0]), len(values[0][0])
    p, q = height // rows, width // cols
    out = []
    for r in range(rows):
        for c in range(cols):
            out.append([values[ch][r * p + y][c * q + x] for y in range(p) for x in range(q) for ch in range(channels)])
    return out


def _norm(v: list[float]) -> float:
    return math.sqrt(sum(a * a for a in v))


def kmeans(points: list[list[float]], clusters: int, iterations: int) -> list[int]:
    """Lloyd's K-Means from the tokens at 0, s, 2s, ... (s = N // K), each seed kept in its own cluster,
    ``iterations`` assignments (ties to the lower cluster), plain means between them."""
    n = len(points)
    step = max(1, n // clusters)
    seeds = [i * step for i in range(clusters)]
    centres = [list(points[s]) for s in seeds]
    labels = [0] * n
    for it in range(iterations):
        if it:
            for k in range(clusters):
                members = [points[i] for i in range(n) if labels[i] == k]
                centres[k] = [sum(col) / len(members) for col in zip(*members)]
        for i in range(n):
            dists = [sum((a - b) ** 2 for a, b in zip(points[i], centre)) for centre in centres]
            labels[i] = min(range(clusters), key=lambda k: (dists[k], k))
        for k, s in enumerate(seeds):
            labels[s] = k
    return labels


def cluster_peaks(delta: list[list[float]], labels: list[int], clusters: int) -> list[list[float]]:
    peaks = [[-math.inf] * len(delta[0]) for _ in range(clusters)]
    for i, row in enumerate(delta):
        peaks[labels[i]] = [max(a, b) for a, b in zip(peaks[labels[i]], row)]
    return peaks


def touching(labels: list[int], grid: tuple[int, int], clusters: int) -> list[set[int]]:
    """Each cluster's neighbours: clusters holding a 4-neighbour of one of its tokens."""
    rows, cols = grid
    near = [set() for _ in range(clusters)]
    for r in range(rows):
        for c in range(cols):
            for rr, cc in ((r + 1, c), (r, c + 1)):
                if rr < rows and cc < cols:
                    a, b = labels[r * cols + c], labels[rr * cols + cc]
                    if a != b:
                        near[a].add(b)
                        near[b].add(a)
    return near


def _ranked(values: list[float]) -> list[int]:
    return sorted(range(len(values)), key=lambda k: (-values[k], k))


def _top_up(chosen: list[int], order: list[int], budget: int) -> list[int]:
    out = list(chosen)
    for i in order:
        if len(out) == budget:
            break
        if i not in out:
            out.append(i)
    return sorted(out)


def first_choice(delta, labels, near, budget: int) -> list[int]:
    clusters = len(near)
    size = [labels.count(k) for k in range(clusters)]
    change = [_norm(row) for row in delta]
    peaks = cluster_peaks(delta, labels, clusters)
    values = []
    for k in range(clusters):
        group = [k, *sorted(near[k])]
        mean = [sum(peaks[g][d] for g in group) / len(group) for d in range(len(delta[0]))]
        top = [max(peaks[g][d] for g in group) for d in range(len(delta[0]))]
        values.append(_norm([2 * m + t for m, t in zip(mean, top)]))
    picks, total = [], 0
    for k in _ranked(values):
        take = min(budget // 10, size[k])
        members = sorted((i for i in range(len(labels)) if labels[i] == k), key=lambda i: (-change[i], i))
        picks += members[:take]
        total += take
        if total > budget:
            break
    by_change = sorted(range(len(delta)), key=lambda i: (-change[i], i))
    return _top_up(picks[:budget], by_change, budget)


def next_choice(delta, labels, counts, clusters: int, budget: int) -> list[int]:
    n = len(delta)
    size = [labels.count(k) for k in range(clusters)]
    change = [_norm(row) for row in delta]
    stale = sorted(range(n), key=lambda i: (counts[i], -change[i], i))
    values = [_norm(p) for p in cluster_peaks(delta, labels, clusters)]
    base = int((budget // 5) * 0.25)
    picks, total = [], 0
    for rank, k in enumerate(_ranked(values)):
        take = min(base, size[k])
        if rank < 3:
            take = min(take * (3 - rank), size[k])
        chosen = sorted((i for i in range(n) if labels[i] == k), key=lambda i: (-change[i], i))[:take]
        if rank:
            old = [i for i in stale if labels[i] == k][: int(take * 0.5)]
            chosen = sorted(set(chosen) | set(old))
        picks += chosen
        total += len(chosen)
        if total > budget * 0.25:
            break
    union = sorted(set(picks[: int(budget * 0.25)]) | set(stale[: int(budget * 0.75)]))
    return _top_up(union, stale, budget)


def choices(
    noises: list[list[list[float]]],
    grid: tuple[int, int],
    select_factor: float,
    stop_idx: int,
    clusters: int,
    iterations: int,
) -> dict[int, list[int]]:
    """The tokens recomputed at each step after stop_idx + 2 (sorted), from one image's noise per step."""
    n = len(noises[0])
    rows, cols = grid
    budget = max(1, int(select_factor * n))
    clusters = min(clusters, n)
    reference = noises[stop_idx + 1]
    out: dict[int, list[int]] = {}
    counts = None
    labels = None
    for step in range(stop_idx + 3, len(noises) + 1):
        noise = noises[step - 1]
        delta = [[a - b for a, b in zip(v, r)] for v, r in zip(noise, reference)]
        if labels is None:
            dim = len(noise[0])
            points = []
            for i, v in enumerate(noise):
                position = [(i // cols) / rows] * (dim // 2) + [(i % cols) / cols] * (dim - dim // 2)
                points.append([0.05 * a + b for a, b in zip(v, position)])
            labels = kmeans(points, clusters, iterations)
            out[step] = first_choice(delta, labels, touching(labels, grid, clusters), budget)
            continue
        last = set(out[step - 1])
        counts = [(0.5 * counts[i] if counts is not None else 0.0) + (1.0 if i in last else 0.0) for i in range(n)]
        out[step] = next_choice(delta, labels, counts, clusters, budget)
    return out


class Simulation:
    """CAT Pruning simulated on an unpatched DiT with forward hooks, for one image under batched CFG
    (rows ``[uncond, cond]``): each wrapped module (``names`` of every block) runs in full on an input
    whose unchosen rows are those it last computed, and keeps only the chosen rows of its output (a
    token's keys and values are projections of its own row, so this is what reusing cached keys,
    values and outputs computes); the model's output keeps the step before's patches of the unchosen
    tokens. The choices come from :func:`choices` on the cond row's outputs."""

    def __init__(self, model, names, grid, select_factor, stop_idx, clusters, iterations):
        self.grid, self.config = grid, (select_factor, stop_idx, clusters, iterations)
        self.stop_idx = stop_idx
        self.chosen = None  # the running step's token list, None in full steps
        self.caching = False
        self.state = {}  # module -> [last input rows, last image output rows]
        self.handles = []
        for block in model.transformer_blocks:
            for name in names:
                module = getattr(block, name, None)
                if module is not None:
                    self.handles.append(module.register_forward_pre_hook(self._before, with_kwargs=True))
                    self.handles.append(module.register_forward_hook(self._after))

    def _before(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        if self.chosen is not None:
            mixed = self.state[module][0].clone()
            mixed[:, self.chosen] = x[:, self.chosen]
            x = mixed
        if self.caching or self.chosen is not None:
            self.state.setdefault(module, [None, None])[0] = x
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    def _after(self, module, args, out):
        image = out[0] if isinstance(out, tuple) else out
        if self.chosen is not None:
            kept = self.state[module][1].clone()
            kept[:, self.chosen] = image[:, self.chosen]
            image = kept
        if self.caching or self.chosen is not None:
            self.state[module][1] = image
        return (image, *out[1:]) if isinstance(out, tuple) else image

    def step(self, step: int, model, kwargs: dict, noises: list) -> torch.Tensor:
        """The model's output for ``kwargs`` as CAT Pruning's step ``step``; ``noises`` (the cond row's
        tokens of the steps before) grows by this step's."""
        self.caching = step == self.stop_idx + 2
        self.chosen = choices(noises, self.grid, *self.config)[step] if step > self.stop_idx + 2 else None
        with torch.no_grad():
            out = model(**kwargs, return_dict=False)[0]
        if self.chosen is not None:
            rows, cols = self.grid
            p, q = out.shape[-2] // rows, out.shape[-1] // cols
            final = self.previous.clone()
            for t in self.chosen:
                r, c = divmod(t, cols)
                final[..., r * p : (r + 1) * p, c * q : (c + 1) * q] = out[..., r * p : (r + 1) * p, c * q : (c + 1) * q]
        else:
            final = out
        noises.append(tokens(out[1], self.grid))
        self.previous = final
        return final

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
