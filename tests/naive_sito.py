"""Naive oracle for SiTo, written from the spec (``/work/shared/specs/diffusion-video-3d.md`` section 1.6) and
the paper: Python loops over cells and tokens, one image at a time, the explicit ``N x N`` cosine matrix, plain
torch hooks on diffusers' ``BasicTransformerBlock`` instead of tokenreduce's engine, and no code shared with
tokenreduce (the noise values are passed in)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Plan:
    """One image's choice: the base tokens, the pruned tokens and, for every token, the token whose output it
    takes (itself when kept)."""

    base: list[int]
    pruned: list[int]
    source: list[int]

    @property
    def kept(self) -> list[int]:
        return [i for i, s in enumerate(self.source) if s == i]


def plan(
    x: Tensor,
    grid: tuple[int, int],
    ratio: float,
    sx: int = 2,
    sy: int = 2,
    sim_beta: float = 1.0,
    noise_alpha: float = 0.0,
    noise: Tensor | None = None,
    recover: str = "base",
) -> Plan:
    """SiTo on one image's block input ``x [N, C]`` on a row-major ``grid``; ``noise [N]`` the N(0, 1) draws."""
    h, w = grid
    n = h * w
    x = x.double()
    unit = x / x.norm(dim=1, keepdim=True)
    cos = (unit @ unit.T).tolist()
    score = [sim_beta * sum(cos[i]) + (noise_alpha * float(noise[i]) if noise is not None else 0.0) for i in range(n)]
    base = []
    for ci in range(h // sy):
        for cj in range(w // sx):
            best = None
            for dy in range(sy):
                for dx in range(sx):
                    t = (ci * sy + dy) * w + cj * sx + dx
                    if best is None or score[t] > score[best]:
                        best = t
            base.append(best)
    base_set = set(base)
    candidates = [i for i in range(n) if i not in base_set]
    partner = {}
    for i in candidates:
        partner[i] = max(base, key=lambda b: (cos[i][b], -b))
    r = min(int(n * ratio), len(candidates))
    pruned = sorted(candidates, key=lambda i: -cos[i][partner[i]])[:r]
    pruned_set = set(pruned)
    kept = [i for i in range(n) if i not in pruned_set]
    source = list(range(n))
    for i in pruned:
        source[i] = partner[i] if recover == "base" else max(kept, key=lambda k: (cos[i][k], -k))
    return Plan(sorted(base), pruned, source)


class NaiveSiTo:
    """SiTo on a diffusers model through its ``BasicTransformerBlock`` s' self-attention: before ``attn1``
    each image keeps its kept tokens, after it every token takes its source's output. ``grid`` gives the
    acting blocks' grid; ``noise(block, n)`` the noise of a block (counted in call order within a forward)."""

    def __init__(
        self,
        model: nn.Module,
        grid: tuple[int, int],
        noise: Callable[[int, int], Tensor] | None = None,
        **config,
    ) -> None:
        self.grid, self.noise, self.config = grid, noise, config
        self.plans: list[list[Plan]] = []  # per acting block call, per image
        self.block = 0
        self.current: list[Plan] | None = None
        self.handles = [model.register_forward_pre_hook(self._start)]
        for module in model.modules():
            if type(module).__name__ == "BasicTransformerBlock":
                self.handles.append(module.register_forward_pre_hook(self._plan, with_kwargs=True))
                self.handles.append(module.attn1.register_forward_pre_hook(self._prune, with_kwargs=True))
                self.handles.append(module.attn1.register_forward_hook(self._recover))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _start(self, module, args) -> None:
        self.block = 0

    def _plan(self, module, args, kwargs) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        block, self.block = self.block, self.block + 1
        self.current = None
        if x.shape[1] != self.grid[0] * self.grid[1]:
            return
        noise = None if self.noise is None else self.noise(block, x.shape[1])
        self.current = [plan(image, self.grid, noise=noise, **self.config) for image in x]
        if not self.current[0].pruned:
            self.current = None
            return
        self.plans.append(self.current)

    def _prune(self, module, args, kwargs):
        if self.current is None:
            return None
        x = args[0]
        kept = torch.stack([image[p.kept] for image, p in zip(x, self.current)])
        return (kept, *args[1:]), kwargs

    def _recover(self, module, args, out):
        if self.current is None:
            return None
        rows = []
        for y, p in zip(out, self.current):
            place = {t: j for j, t in enumerate(p.kept)}
            rows.append(torch.stack([y[place[p.source[i]]] for i in range(len(p.source))]))
        return torch.stack(rows)
