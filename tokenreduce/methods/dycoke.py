"""``dycoke``: DyCoke (Tao et al., "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language
Models", CVPR 2025, arXiv 2411.15024). Reference: ``KD-TAO/DyCoke`` at dd74634, ``llava/model/llava_arch.py``
(``dycole_ttm``) and ``llava/model/language_model/modeling_qwen2.py`` (``PrunableDynamicCache``,
``dycoke_pruning``), read on LLaVA-OneVision with its Qwen2 LLM.

Two parts in a preset :class:`~tokenreduce.methods.stack.Stack`: temporal token merging before the LLM
(:class:`TemporalTokenMerging`, on each video's projected tokens) and a decode-time selection of the
cached video tokens (:class:`DecodeCacheSelection`). Neither part is registered under its own name
(a name registered at two stages resolves to the pre-LLM one); each can be applied alone as an object.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor

from tokenreduce.core import Selection, frame_pair_drop, keep
from tokenreduce.methods.llm import LLMContext, LLMMethod, check_layer
from tokenreduce.methods.stack import PresetStack
from tokenreduce.methods.visual import VideoLayout, VisualContext, VisualMethod
from tokenreduce.registry import loadable, register_method
from tokenreduce.validate import as_int, as_real

PAPER = "Tao et al., DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models, CVPR 2025"


def compared_frames(frames: int) -> list[tuple[int, int]]:
    """The reference's ``(pruned frame, frame it is compared with)`` pairs for a video of ``frames``
    frames: each odd frame against the one before (``range(0, frames - 1, 2)``), then every fourth frame
    ``f`` from 0 prunes ``f + 2`` against ``f`` (``range(0, frames - 4, 4)``, so never in the last four)."""
    return [(f + 1, f) for f in range(0, frames - 1, 2)] + [(f + 2, f) for f in range(0, frames - 4, 4)]


@loadable
@dataclass
class TemporalTokenMerging(VisualMethod):
    """DyCoke's first stage (TTM): in each video, frames are taken in pairs ``(f, f + 1)``; of frame
    ``f + 1`` only the ``int((1 - merge_ratio) * T)`` tokens least cosine-similar to the token at the
    same place in frame ``f`` stay (``T`` tokens per frame), and frame ``f`` stays whole; then, for every
    fourth frame ``f``, frame ``f + 2`` is cut the same way against frame ``f`` (see
    :func:`compared_frames`). Despite the name it drops (no averaging), as the reference does.

    The kept count is fixed by the layout and ``merge_ratio``: ``F * T - P * (T - int((1 - k) * T))``
    for ``F`` frames and ``P = len(compared_frames(F))`` pruned frames (:meth:`num_kept_video`).
    Default ``merge_ratio=0.7`` (the reference README's evaluation, its lmms-eval wrapper and
    LightCompress; the reference's ``load_pretrained_model`` default is 0.3). ``T`` is the video's own
    per-frame grid (the reference fixes 196, LLaVA-OneVision's 14x14 pooled grid).

    Departures and choices the reference leaves open: the kept tokens of a pruned frame go to the LLM in
    their places' order (the reference appends them in ``topk`` order, by increasing similarity); ties
    go to the lower place; similarities are computed in float32 on the original tokens (the second pass
    of the reference also compares the original frames); with an odd frame count the last frame stays
    whole (the reference's pairing loop never appends it, so it is lost); each video of a batch or
    prompt is cut on its own (the reference has one video per prompt, batch 1). LLaVA-OneVision's
    newline token after a video's frames is always kept (as the reference appends it after TTM).
    """

    name = "dycoke_ttm"
    paper = PAPER
    modalities = frozenset({"video"})
    default_keep_ratio = None

    merge_ratio: float = 0.7

    def __post_init__(self) -> None:
        super().__post_init__()
        self.merge_ratio = as_real("merge_ratio", self.merge_ratio, 0, 1, high_open=True)

    def has_own_budget(self) -> bool:
        return True

    def kept_per_frame(self, tokens: int) -> int:
        """Tokens a pruned frame of ``tokens`` keeps: the reference's ``int((1 - k) * T)``."""
        return int((1 - self.merge_ratio) * tokens)

    def num_kept_video(self, layout: VideoLayout) -> int:
        tokens = layout.grid[0] * layout.grid[1]
        return layout.tokens - len(compared_frames(layout.frames)) * (tokens - self.kept_per_frame(tokens))

    def num_kept(self, num_tokens: int, grid: tuple[int, int] | None) -> int:
        return num_tokens  # images pass whole: the method acts on videos only

    def select(self, ctx: VisualContext) -> Selection:
        layout = ctx.video
        if layout is None:
            raise ValueError(f"{self.name!r} acts on videos only")
        tokens = layout.grid[0] * layout.grid[1]
        frames = ctx.features.unflatten(1, (layout.frames, tokens))
        picked = frame_pair_drop(frames, compared_frames(layout.frames), self.kept_per_frame(tokens))
        return keep(picked, ctx.features.shape[1])


@loadable
@dataclass
class DecodeCacheSelection(LLMMethod):
    """DyCoke's second stage: the prefill runs unchanged and the KV cache keeps every entry; on each
    decode step, layer ``layer - 1``'s attention of the current token (softmax over every cached entry,
    mean over heads) is read over each video's cached tokens, and the layers from ``layer`` on attend to
    the ``int(n * (1 - prune_ratio))`` of them it attends to most (``n`` the video's tokens in the
    cache) plus every other entry; the selection is chosen again only when the cosine between this
    step's and the previous step's attention vectors is below ``threshold`` (first step: always).

    Defaults ``layer=3``, ``prune_ratio=0.7`` (README evaluation; the reference's loader and lmms-eval
    wrapper default to 0.8), ``threshold=0.9`` (fixed in the reference). The attention row is recomputed
    from the layer's query projection and its cached keys, so every layer keeps its attention kernel;
    layers from ``layer`` on read the gathered entries (the reference's ``PrunableDynamicCache.update``).

    Departures and choices the reference leaves open: on a step whose attention is stable (cosine >=
    ``threshold``) the previous selection is kept, as the paper describes; the reference resets its
    selection at the layers before ``layer`` on every step and so attends to the whole cache on such
    steps. The state starts afresh with every prompt (the reference keeps the last attention vector
    across samples). A video's span is all its tokens in the cache (the reference's span stops one
    token short of LLaVA-OneVision's newline token and the last video token); each video of a prompt is
    selected on its own with its own similarity test, and each row of a batch (the reference reads row
    0 and one video).
    """

    name = "dycoke_decode"
    paper = PAPER
    modalities = frozenset({"video"})
    scores = "none"

    layer: int = 3
    prune_ratio: float = 0.7
    threshold: float = 0.9
    positions: str = field(default="keep", init=False)

    def __post_init__(self) -> None:
        self.layer = as_int("layer", self.layer, 1)
        self.prune_ratio = as_real("prune_ratio", self.prune_ratio, 0, 1, high_open=True)
        self.threshold = as_real("threshold", self.threshold, -1, 1)

    def prune_layers(self, depth: int) -> tuple[int, ...]:
        check_layer("layer", self.layer, depth)
        return ()

    def decode_layer(self, depth: int) -> int | None:
        check_layer("layer", self.layer, depth)
        return self.layer

    def kept(self, tokens: int, stage: int) -> int:
        return tokens

    def select(self, ctx: LLMContext) -> list[Selection]:
        raise NotImplementedError(f"{self.name!r} prunes nothing at the prefill")

    def decode_keep(self, attention: Tensor, previous: Tensor | None, kept: Tensor | None) -> Tensor:
        if kept is not None and previous is not None:
            if F.cosine_similarity(attention.float(), previous.float(), dim=0) >= self.threshold:
                return kept
        return attention.topk(int(attention.shape[0] * (1 - self.prune_ratio))).indices.sort().values


@register_method
@dataclass
class DyCoke(PresetStack):
    """DyCoke: temporal token merging of each video before the LLM (``merge_ratio``, see
    :class:`TemporalTokenMerging`), then, while decoding, the layers from ``layer`` on attend to the
    cached video tokens that layer ``layer - 1`` attends to most (``prune_ratio``, re-chosen when that
    attention changes; see :class:`DecodeCacheSelection`). Video inputs of Qwen2-VL, Qwen2.5-VL and
    LLaVA-OneVision; images pass unchanged. Defaults: ``merge_ratio=0.7``, ``layer=3``,
    ``prune_ratio=0.7``, ``threshold=0.9`` (the reference README's evaluation setting)."""

    name = "dycoke"
    paper = PAPER

    merge_ratio: float = 0.7
    layer: int = 3
    prune_ratio: float = 0.7
    threshold: float = 0.9

    def __post_init__(self) -> None:
        self.before = TemporalTokenMerging(merge_ratio=self.merge_ratio)
        self.inside = DecodeCacheSelection(self.layer, self.prune_ratio, self.threshold)
        self.merge_ratio, self.layer = self.before.merge_ratio, self.inside.layer
        self.prune_ratio, self.threshold = self.inside.prune_ratio, self.inside.threshold
        super().__post_init__()
