"""``holitom``: HoliTom (Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language
Models", NeurIPS 2025, arXiv 2505.21334): merging before the LLM (:class:`HoliTomOuter`), then inside it
(:class:`HoliTomInner`).

One name, two places, as ``todre``: ``tokenreduce.apply(vlm, "holitom")`` builds :class:`HoliTom`, a
preset :class:`~tokenreduce.methods.stack.Stack` of both parts; each part alone is its class
(``apply(vlm, HoliTomOuter(keep_ratio=0.15))``, or stacked with another in-LLM method), not registered
under the name, since a name registered at two stages resolves to the pre-LLM one by default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenreduce.core import Selection, apportion, density_peaks, received_attention, static_windows, top_k_positions
from tokenreduce.methods.fastvid import each_video, identity
from tokenreduce.methods.llm import AttentionRankPrune, LLMContext, check_layer
from tokenreduce.methods.stack import PresetStack
from tokenreduce.methods.visual import VisualContext, VisualMethod
from tokenreduce.registry import register_method
from tokenreduce.validate import as_int, as_real

# One group of tokens that shares a budget: ``(frames, positions)``: the positions of a frame's grid
# taken on each of the frames (several frames: the tokens static through a window, averaged over it).
Part = tuple[list[int], Tensor]


PAPER = "Shao et al., HoliTom: Holistic Token Merging for Fast Video Large Language Models, NeurIPS 2025"


@dataclass
class HoliTomOuter(VisualMethod):
    """Temporal windows of static tokens merged over time, then the salient and density-peak tokens of
    each part, on the projected tokens of each video.

    From the reference (``cokeshao/HoliTom`` ``holitom/llava_arch.py`` at e9b2972, Apache-2.0), per video of
    ``T`` frames of ``P`` tokens:

    1. Per position, the cosine between a token and the same position's token in the next frame; a
       token is static over a transition when it is above ``tau``.
    2. Windows (``select_static_windows``): the split of the frames into consecutive windows of at most
       ``max_window`` frames that maximises ``sum of (positions static through the window) * (length - 1)``,
       by dynamic programming (a longer window only when strictly better).
    3. In a window of several frames the static positions become one token each, their mean over the
       window's frames; the other (dynamic) positions stay per frame.
    4. Each part (a window's static tokens; a frame's dynamic tokens) keeps its share of the budget. The
       static share: DPC-kNN (``density_peaks`` with ``min(neighbours, share)`` neighbours, the
       reference's ``min(K, cluster_num)``) picks the centres; every other token joins its nearest
       centre, and a cluster becomes ``beta * centre + (1 - beta) * mean(members)`` (the reference's
       default, ``BETA=0.6``; ``beta=None`` is its ``NO_BETA=1``: the plain mean of centre and members; a
       centre without members stays as it is). The dynamic share: ``round(share * (1 - contextual))``
       tokens of highest saliency stay as they are, the rest of the share are DPC-kNN clusters of the
       others, merged the same way (``contextual`` is the reference's ``D``, 0 by default: no clusters).

    Defaults: ``keep_ratio=0.15``, ``tau=0.8`` (the README's evaluation; the code's defaults are 0.1 and
    0.8), ``neighbours=7``, ``beta=0.6``, ``contextual=0``, no window limit (the reference's 1024).
    HoliTom's second part, merging inside the LLM, is :class:`HoliTomInner`; ``holitom`` is both.

    Choices this implementation makes where the reference leaves them open or depends on content: the
    reference's budget is content-dependent (its ratio is raised by the share merged over time, then
    each part rounds on its own); here the video's fixed budget ``round(keep_ratio * T * P)`` is split over
    the parts in proportion to their sizes, largest remainders first (``apportion``), so the count
    depends on the layout only. When that budget exceeds the tokens left after merging over time, no
    window merges (every frame is its own part). Saliency is the attention each token receives, averaged
    over the frame's tokens as queries, ``softmax(x . x / sqrt(D))``, on the projected tokens (the
    reference averages the vision tower's last-layer attention over heads and queries and pools it as
    the features; the engine gives no vision attention for videos). Outputs are in the order of the
    token each inherits its position from (a static cluster: its centre on the window's first frame,
    a dynamic cluster: its centre), which is the reference's order in its ``grid`` newline mode; its
    ``one_token`` mode puts a window's static tokens first. Equal scores go to the earlier token (no
    noise); keeping every token is the identity.
    """

    name = "holitom_outer"
    paper = PAPER
    modalities: ClassVar[frozenset[str]] = frozenset({"video"})
    default_keep_ratio = 0.15

    tau: float = 0.8  # a token is static over a transition above this cosine similarity
    neighbours: int = 7  # K of the k-nearest-neighbour density (capped by the cluster count)
    beta: float | None = 0.6  # the centre's weight in its cluster; None: a plain mean of centre and members
    contextual: float = 0.0  # D: share of each frame's dynamic budget merged into clusters
    max_window: int | None = None  # the longest window, in frames; None: any

    def __post_init__(self) -> None:
        super().__post_init__()
        self.tau = as_real("tau", self.tau, -1, 1)
        self.neighbours = as_int("neighbours", self.neighbours, 1)
        if self.beta is not None:
            self.beta = as_real("beta", self.beta, 0, 1)
        self.contextual = as_real("contextual", self.contextual, 0, 1)
        if self.max_window is not None:
            self.max_window = as_int("max_window", self.max_window, 1)

    def select(self, ctx: VisualContext) -> Selection:
        rows = each_video(ctx, self.name, self._video)
        return identity(ctx) if rows is None else Selection(*(torch.stack(t) for t in zip(*rows)))

    def _video(self, x: Tensor, count: int) -> tuple[Tensor, Tensor, Tensor]:
        """``x [T, P, D]`` -> ``(slot [T * P], index [count], coeff [T * P])``, outputs in token order."""
        t, p, d = x.shape
        unit = F.normalize(x, dim=-1)
        static = (unit[:-1] * unit[1:]).sum(dim=-1) > self.tau  # [T - 1, P]
        parts = _parts(static, static_windows(static, self.max_window), p)
        if count > sum(len(at) for _, at in parts):
            parts = _parts(static, [(f, f) for f in range(t)], p)
        sizes = torch.tensor([[len(at) for _, at in parts]])
        shares = apportion(sizes.float(), count, sizes)[0].tolist()
        saliency = received_attention(x[:, None], x[:, None], d**-0.5)  # [T, P]
        outputs: list[tuple[int, Tensor, Tensor]] = []  # (index, inputs, their weights) per output
        for (frames, at), share in zip(parts, shares):
            if not share:
                continue
            feats = x[frames][:, at].mean(dim=0)  # [n, D]
            kept = torch.zeros(0, dtype=torch.long, device=x.device)
            if len(frames) == 1 and (dominant := round(share * (1 - self.contextual))):
                kept = top_k_positions(saliency[frames[0], at][None], dominant)[0]
                outputs += [(frames[0] * p + int(at[i]), torch.tensor([frames[0] * p + int(at[i])]), torch.ones(1)) for i in kept]
            if share > len(kept):
                outputs += self._clusters(feats, kept, share - len(kept), frames, at, p)
        outputs.sort(key=lambda o: o[0])
        slot = torch.full((t * p,), -1, dtype=torch.long)
        coeff = torch.zeros(t * p)
        for j, (_, inputs, weights) in enumerate(outputs):
            slot[inputs], coeff[inputs] = j, weights
        index = torch.tensor([o[0] for o in outputs])
        return slot.to(x.device), index.to(x.device), coeff.to(x.device)

    def _clusters(
        self, feats: Tensor, taken: Tensor, count: int, frames: list[int], at: Tensor, p: int
    ) -> list[tuple[int, Tensor, Tensor]]:
        """``count`` DPC-kNN clusters of the part's tokens ``feats [n, D]`` (at grid positions ``at`` on
        ``frames``) other than ``taken``: per cluster its index, inputs and their weights."""
        free = torch.ones(len(at), dtype=torch.bool).index_fill(0, taken.cpu(), False).nonzero().flatten()
        assignment, centres = density_peaks(feats[free.to(feats.device)], count, min(self.neighbours, count))
        out = []
        for j, centre in enumerate(centres.tolist()):
            members = (assignment == j).nonzero().flatten().cpu()
            others = len(members) - 1
            if self.beta is None or not others:
                weight = torch.full((len(members),), 1 / len(members))
            else:
                weight = torch.where(members == centre, self.beta, (1 - self.beta) / others)
            grid = at.cpu()[free[members]]
            inputs = torch.tensor([f * p + int(g) for f in frames for g in grid])
            out.append((frames[0] * p + int(at[free[centre]]), inputs, (weight / len(frames)).repeat(len(frames))))
        return out


def _parts(static: Tensor, windows: list[tuple[int, int]], p: int) -> list[Part]:
    """Per window, its static positions merged over its frames (windows of several frames), then each
    frame's other positions."""
    parts: list[Part] = []
    for first, last in windows:
        still = static[first:last].all(dim=0) if last > first else torch.zeros(p, dtype=torch.bool, device=static.device)
        frames = list(range(first, last + 1))
        if bool(still.any()):
            parts.append((frames, still.nonzero().flatten()))
        if not bool(still.all()):
            parts += [([f], (~still).nonzero().flatten()) for f in frames]
    return parts


@dataclass
class HoliTomInner(AttentionRankPrune):
    """HoliTom's merging inside the LLM: before layer ``layer`` (k), each video keeps the
    ``round((1 - merge_ratio) * tokens)`` tokens the last prompt token attended to most at layer k - 1
    (softmax over all tokens, mean over heads), and every other token of the video is merged into the kept
    one whose hidden state (the input of layer k) is most cosine-similar to its own.

    From the reference (``cokeshao/HoliTom`` ``holitom/modeling_qwen2.py`` at e9b2972): the merge runs
    over the other tokens in order, each halving into its target in place, ``h <- (h + h') / 2`` (so a
    target that takes ``m1 .. mj`` becomes ``h / 2^j + sum_i m_i / 2^(j - i + 1)``), with the
    similarities computed once before merging; the kept tokens keep their positions
    (``position_ids = keep_indexs``). Defaults: ``layer=None``: 18 of 28 layers scaled to the LLM's depth,
    ``max(1, round(18 * depth / 28))`` (the README's evaluation on LLaVA-OneVision-7B, whose Qwen2 has 28
    layers: ours to scale it; the code's default
    is 3; ``HOLITOM_k``), ``merge_ratio=0.5`` (``HOLITOM_r``). Choices the reference leaves open: every
    video of a batch is ranked and merged on its own (the reference takes batch 1 and one video; its
    span includes LLaVA-OneVision's newline token, as here); of equally similar kept tokens the earliest
    takes the merge (the reference: the first in attention order); the kept count is at least 1.
    """

    name = "holitom_inner"
    paper = PAPER
    modalities: ClassVar[frozenset[str]] = frozenset({"video"})

    layer: int | None = None  # k: the first layer that reads the merged tokens (None: 18 of 28, scaled)
    merge_ratio: float = 0.5  # r: the share of each video's tokens merged away
    positions: str = "keep"

    def __post_init__(self) -> None:
        if self.layer is not None:
            self.layer = as_int("layer", self.layer, 1)
        self.merge_ratio = as_real("merge_ratio", self.merge_ratio, 0, 1, high_open=True)
        self.check_positions()

    def prune_layers(self, depth: int) -> tuple[int, ...]:
        if self.layer is None:
            return (min(depth - 1, max(1, round(18 * depth / 28))),)
        check_layer("layer", self.layer, depth)
        return (self.layer,)

    def kept(self, tokens: int, stage: int) -> int:
        return self.kept_count(tokens, 1 - self.merge_ratio)

    def select(self, ctx: LLMContext) -> list[Selection]:
        assert ctx.attention is not None
        out = []
        for span, count in zip(ctx.spans, ctx.keep):
            n, device = span.length, ctx.hidden.device
            kept = top_k_positions(ctx.attention[span.row, span.start : span.start + n][None], count)[0]
            others = torch.ones(n, dtype=torch.bool, device=device).index_fill(0, kept, False).nonzero().flatten()
            unit = F.normalize(ctx.hidden[span.row, span.start : span.start + n].float(), dim=-1)
            target = (unit[others] @ unit[kept].T).argmax(dim=1)
            slot = torch.empty(n, dtype=torch.long, device=device).index_copy(0, kept, torch.arange(count, device=device))
            slot = slot.index_copy(0, others, target)
            # every later merge into the same target halves what it holds
            later = torch.triu(target[:, None] == target[None, :], diagonal=1).sum(dim=1)
            weight = torch.empty(n, device=device).index_copy(0, others, 0.5 ** (later + 1.0))
            weight = weight.index_copy(0, kept, 0.5 ** torch.bincount(target, minlength=count).float())
            out.append(Selection(slot[None], kept[None], weight[None]))
        return out


@register_method
@dataclass
class HoliTom(PresetStack):
    """HoliTom: each video's tokens merged over time windows and clustered before the LLM
    (:class:`HoliTomOuter`: ``keep_ratio``, ``tau``, ``neighbours``, ``beta``, ``contextual``,
    ``max_window``, ``positions``), then merged once more inside the LLM before layer ``layer``
    (:class:`HoliTomInner`: ``layer``, ``merge_ratio``; its kept tokens keep their positions, as the
    reference). Acts on videos only; images pass through. Defaults as the two parts'."""

    name = "holitom"
    paper = PAPER

    keep_ratio: float | None = None
    keep_tokens: int | None = None
    tau: float = 0.8
    neighbours: int = 7
    beta: float | None = 0.6
    contextual: float = 0.0
    max_window: int | None = None
    layer: int | None = None
    merge_ratio: float = 0.5
    positions: str = "auto"

    def __post_init__(self) -> None:
        outer = ("keep_ratio", "keep_tokens", "positions", "tau", "neighbours", "beta", "contextual", "max_window")
        self.before = HoliTomOuter(**{k: getattr(self, k) for k in outer})
        self.inside = HoliTomInner(layer=self.layer, merge_ratio=self.merge_ratio)
        self.keep_ratio, self.keep_tokens = self.before.keep_ratio, self.before.keep_tokens
        super().__post_init__()
