"""``fastvid``: FastVID (Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language
Models", NeurIPS 2025, arXiv 2503.11187)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenreduce.core import (
    Selection,
    apportion,
    cls_attention,
    cut_segments,
    density_peak_scores,
    keep,
    mix,
    stable_order,
    top_k_positions,
)
from tokenreduce.methods.visual import VideoLayout, VisualContext, VisualMethod
from tokenreduce.registry import register_method
from tokenreduce.validate import as_int, as_real

Rows = tuple[Tensor, ...]  # what a method computes for one video


def each_video(ctx: VisualContext, method: str, one: Callable[[Tensor, int], Rows]) -> list[Rows] | None:
    """``one(frames [T, P, D] float32, ctx.keep)`` for each video of ``ctx``; ``None`` when ``ctx`` keeps every
    token (then the selection is :func:`identity`). Raises when the call holds images (``method`` names the method)."""
    if ctx.video is None:
        raise ValueError(f"method {method!r} selects among the frames of videos, and this call holds images")
    x = ctx.features.float()
    if ctx.keep >= x.shape[1]:
        return None
    return [one(v.view(ctx.video.frames, -1, x.shape[2]), ctx.keep) for v in x]


def identity(ctx: VisualContext) -> Selection:
    """Every token of ``ctx`` kept as it is."""
    m, n = ctx.features.shape[:2]
    return keep(torch.arange(n, device=ctx.features.device).expand(m, -1), n)


@register_method
@dataclass
class FastVID(VisualMethod):
    """Dynamic temporal segmentation, then per frame the most salient tokens and density-peak anchors
    that merge the rest of their segment, on the projected tokens of each video.

    From the reference (``LunarShen/FastVID`` at a40a109, MIT: the LLaVA-OneVision implementation
    ``fastvid_llavaonevision/.../modeling_qwen2.py``, which the README names the core code, and the
    Qwen2.5-VL port), per video of ``T`` frames of ``P`` tokens:

    1. DySeg: each frame's global feature, cosine between consecutive frames; a segment ends after the
       ``segments - 1`` least similar transitions and after every one below ``tau``.
    2. Each frame keeps ``int(P * keep_ratio)`` tokens (``num_kept_video`` is ``T`` times that), of which
       ``int(budget * context)`` are density anchors and the rest salient tokens (ATS): the frame's
       top tokens by saliency.
    3. Anchor frames: every ``anchor_stride``-th frame of a segment counted back from its last; the
       segment's anchor budget (its frames' context counts) goes to them. On each anchor frame the anchors
       are its non-salient tokens of highest DPC-kNN score (density ``exp(-mean squared distance to the
       neighbours nearest``, ``neighbours=4`` with the token itself, distance to the nearest denser
       token, Euclidean over ``sqrt(D)``).
    4. DTM: every non-salient token of the segment (every frame's) joins the most cosine-similar anchor of
       each anchor frame; an anchor becomes ``w * anchor + (1 - w) * mean(its members)``, with
       ``w = max(1 / (members + 1), beta)`` (the anchor is one of its members).
    5. The LLM reads the salient tokens and anchors in their original order, at their own positions
       (``positions="keep"``, as the reference's ``position_ids = keep_indexs``).

    Choices this implementation makes where the reference leaves them open or depends on content:
    the global feature and the saliency come from the projected tokens, since the engine gives no
    vision-tower attention for videos: the global feature is the frame's mean token (the Qwen2.5-VL
    port's rule; the LLaVA-OneVision code uses SigLIP's pooling head, which LLaVA-OneVision drops), and the
    saliency is the softmax attention of that mean token over the frame's tokens,
    ``softmax(mean(x) . x / sqrt(D))`` (the Qwen2.5-VL port's mean query over the last vision block's
    keys, here with the tokens as queries and keys). The count is fixed by the layout: the reference
    floors the per-anchor share (``budget // anchors``) and loses the remainder; here the segment's
    whole anchor budget is split over its anchor frames (the earlier ones get the remainder), capped by
    each frame's non-salient tokens, any excess going to the segment's other frames in proportion to
    their room (the reference, at ``keep_ratio`` above about 0.25, would ask an anchor frame for more
    anchors than it holds). ``keep_tokens`` splits evenly over the frames (the earlier ones get the
    remainder). Fewer than ``segments - 1`` transitions all cut; equal similarities or scores go to the
    earlier frame or token (the reference adds 1e-6 noise to densities); an anchor always joins itself.
    Keeping every token is the identity. Defaults are the LLaVA-OneVision script's: ``keep_ratio=0.1``,
    ``segments=8``, ``tau=0.9``, ``context=0.4``, ``anchor_stride=4``, ``beta=0.6`` (the Qwen2.5-VL
    script uses ratio 0.27, tau 0.84, and splits segments again below a similarity of 0.95).
    """

    name = "fastvid"
    paper = "Shen et al., FastVID: Dynamic Density Pruning for Fast Video Large Language Models, NeurIPS 2025"
    modalities: ClassVar[frozenset[str]] = frozenset({"video"})
    default_keep_ratio = 0.1

    positions: str = "keep"
    segments: int = 8  # c: at least this many segments (the least similar transitions cut)
    tau: float = 0.9  # every transition of lower cosine similarity cuts too
    context: float = 0.4  # d: share of each frame's budget that goes to density anchors
    anchor_stride: int = 4  # p: every p-th frame of a segment, from its last, holds anchors
    beta: float = 0.6  # the least weight of an anchor in its merged token
    neighbours: int = 4  # k of the k-nearest-neighbour density (the token itself included)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.segments = as_int("segments", self.segments, 1)
        self.tau = as_real("tau", self.tau, -1, 1)
        self.context = as_real("context", self.context, 0, 1)
        self.anchor_stride = as_int("anchor_stride", self.anchor_stride, 1)
        self.beta = as_real("beta", self.beta, 0, 1)
        self.neighbours = as_int("neighbours", self.neighbours, 1)

    def num_kept_video(self, layout: VideoLayout) -> int:
        tokens = layout.grid[0] * layout.grid[1]
        if self.keep_tokens is not None:
            return self.num_kept(layout.frames * tokens, None)
        return layout.frames * max(1, math.floor(self.keep_ratio * tokens))

    def select(self, ctx: VisualContext) -> Selection:
        rows = each_video(ctx, self.name, self._video)
        return identity(ctx) if rows is None else mix(torch.stack([r[0] for r in rows]), index=torch.stack([r[1] for r in rows]))

    def _video(self, x: Tensor, count: int) -> tuple[Tensor, Tensor]:
        """``x [T, P, D]`` -> ``(matrix [count, T * P], index [count])``, outputs in token order."""
        t, p, d = x.shape
        device = x.device
        flat = x.reshape(t * p, d)
        glob = F.normalize(x.mean(dim=1), dim=-1)
        sizes = cut_segments((glob[:-1] * glob[1:]).sum(dim=-1), self.segments - 1, self.tau)
        budget = [count // t + (f < count % t) for f in range(t)]
        salient = [b - math.floor(b * self.context) for b in budget]
        saliency = cls_attention(x.mean(dim=1, keepdim=True)[:, None], x[:, None], d**-0.5)  # [T, P]
        rows: dict[int, Tensor] = {}
        rest = []
        for f in range(t):
            chosen = top_k_positions(saliency[f : f + 1], salient[f])[0] if salient[f] else saliency.new_zeros(0).long()
            for i in chosen.tolist():
                rows[f * p + i] = F.one_hot(torch.tensor(f * p + i, device=device), t * p).float()
            free = torch.ones(p, dtype=torch.bool, device=device).index_fill(0, chosen, False)
            rest.append(free.nonzero().flatten())
        start = 0
        for length in sizes:
            seg = range(start, start + length)
            anchor = torch.tensor([[float((start + length - 1 - f) % self.anchor_stride == 0) for f in seg]])
            room = torch.tensor([p - salient[f] for f in seg])
            shares = apportion(anchor, sum(budget[f] - salient[f] for f in seg), room)[0].tolist()
            pool = torch.cat([f * p + rest[f] for f in seg])
            for f, share in zip(seg, shares):
                if share:
                    rows.update(self._anchors(flat, rest[f], f * p, pool, share))
            start += length
        index = torch.tensor(sorted(rows), device=device)
        return torch.stack([rows[i] for i in index.tolist()]), index

    def _anchors(self, flat: Tensor, free: Tensor, offset: int, pool: Tensor, count: int) -> dict[int, Tensor]:
        """The ``count`` anchors among the tokens ``offset + free`` of one frame, each merging the tokens of
        ``pool`` (indices into ``flat [N, D]``) most similar to it: ``{anchor index: its row [N]}``."""
        score, _ = density_peak_scores(flat[offset + free][None], self.neighbours)
        anchors = offset + free[stable_order(score)[0, :count]]
        unit = F.normalize(flat, dim=-1)
        joins = (unit[pool] @ unit[anchors].T).argmax(dim=1)
        for j, a in enumerate(anchors.tolist()):
            joins[pool == a] = j
        members = torch.bincount(joins, minlength=count).float()
        weight = (1 / (members + 1)).clamp(min=self.beta)
        rows = torch.zeros(count, flat.shape[0], device=flat.device)
        rows[torch.arange(count, device=flat.device), anchors] = weight
        rows.index_put_((joins, pool), ((1 - weight) / members)[joins], accumulate=True)
        return dict(zip(anchors.tolist(), rows))
