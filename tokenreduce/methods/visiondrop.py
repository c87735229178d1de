"""``visiondrop``: VisionDrop ("Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment",
AAAI 2026, arXiv 2506.22283)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenreduce.core import Selection, dominant_contextual, keep
from tokenreduce.methods.llm import LLMContext, LLMMethod, check_layer
from tokenreduce.methods.stack import PresetStack
from tokenreduce.methods.visionzip import VisionZip
from tokenreduce.registry import loadable, register_method
from tokenreduce.validate import as_int, as_int_tuple, as_sequence

REFERENCE_DEPTH = 32  # LLaVA-1.5-7B's Vicuna, where the reference's layers [8, 16, 24] sit
REFERENCE_LAYERS = (8, 16, 24)
STAGES = ((30, 5), (22, 4), (16, 3))  # (dominant, contextual) per LLM stage: the README's 32-token setting
PAPER = "Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment, AAAI 2026 (arXiv 2506.22283)"


@loadable
@dataclass
class VisionDropLLM(LLMMethod):
    """VisionDrop's in-LLM stages: before each layer of ``layers``, every image keeps ``stages[j]``
    = (dominant, contextual) tokens. Dominant: the image tokens that the image's own tokens attend to
    most at that layer (its own queries and keys after the input norm and rotary embedding; causal
    softmax over the whole row, then the image's columns, mean over heads and over the image's
    queries). Contextual: VisionZip's merge of the rest (:func:`~tokenreduce.core.dominant_contextual`)
    with the layer's rotated keys averaged over heads as the metric. Built by :class:`VisionDrop`."""

    name = "visiondrop_llm"
    paper = PAPER
    scores_from = "own"
    scores = "visual"

    layers: Sequence[int] | None = None
    stages: Sequence[Sequence[int]] = STAGES
    positions: str = "auto"

    def __post_init__(self) -> None:
        pairs = as_sequence("stages", self.stages, "(dominant, contextual) pairs")
        checked = []
        for j, pair in enumerate(pairs):
            pair = as_int_tuple(f"stages[{j}]", pair, 0)
            if len(pair) != 2 or pair[0] < 1:
                raise ValueError(f"stages[{j}] must be a (dominant >= 1, contextual >= 0) pair, got {pair}")
            checked.append(pair)
        self.stages = tuple(checked)
        totals = [d + c for d, c in self.stages]
        if not totals or totals != sorted(totals, reverse=True):
            raise ValueError(f"stages must be a non-empty sequence of pairs whose totals do not increase, got {self.stages}")
        if self.layers is not None:
            self.layers = as_int_tuple("layers", self.layers, 1)
            if len(self.layers) != len(self.stages) or list(self.layers) != sorted(set(self.layers)):
                raise ValueError(f"layers must be {len(self.stages)} increasing layer indices (one per stage), got {self.layers}")
        self.check_positions()

    def prune_layers(self, depth: int) -> tuple[int, ...]:
        if self.layers is None:
            count = len(self.stages)
            layers = tuple(sorted({max(1, layer * depth // REFERENCE_DEPTH) for layer in REFERENCE_LAYERS[:count]}))
            if len(layers) != count or count > len(REFERENCE_LAYERS):
                raise ValueError(f"an LLM of {depth} layers cannot hold {count} pruning stages by default; pass layers")
        else:
            layers = tuple(self.layers)
        for layer in layers:
            check_layer("layers", layer, depth)
        return layers

    def kept(self, tokens: int, stage: int) -> int:
        return min(tokens, sum(self.stages[stage]))

    def select(self, ctx: LLMContext) -> list[Selection]:
        assert ctx.scores is not None and ctx.keys is not None
        out = []
        for span, k, score in zip(ctx.spans, ctx.keep, ctx.scores):
            n = span.length
            if k == n:  # nothing to drop: the image stays as it is (the reference would reorder it)
                out.append(keep(torch.arange(n, device=score.device)[None], n))
                continue
            dominant = min(self.stages[ctx.stage][0], k)
            picked = score.topk(dominant).indices.sort().values
            metric = ctx.keys[span.row, :, span.start : span.start + n].float().mean(dim=0)
            out.append(dominant_contextual(picked[None], metric[None], k - dominant))
        return out


@register_method
@dataclass
class VisionDrop(PresetStack):
    """VisionZip's dominant + contextual tokens before the LLM, then VisionDrop's in-LLM stages
    (:class:`VisionDropLLM`) among the tokens kept.

    From the reference (``Ruixxxx/VisionDrop`` at f7a9444: ``llava/visionzip/clip_encoder.py`` for the
    encoder stage, ``llava/model/modeling_llama_visiondrop.py`` ``visiondrop_rank_drop`` for the LLM):
    ``dominant=42, contextual=6`` in the vision encoder (VisionZip's class-token attention and key
    merge; here the class token counts among the dominant ones, as in ``visionzip``), then before LLM
    layers ``[8, 16, 24]`` (of 32) each image keeps ``[[30, 5], [22, 4], [16, 3]]`` (dominant,
    contextual) tokens, which the README puts at 32 tokens on average. Positions are re-indexed after
    each stage (``positions="auto"``: Qwen's M-RoPE ids keep theirs); each row is selected on its own.

    Choices the reference leaves open: ``layers=None`` scales ``[8, 16, 24]`` to the model's depth
    (``8 * depth // 32``...); the stage counts are absolute (as the reference's), capped at an image's
    tokens; a stage that would keep every token of an image leaves it untouched (the reference would
    reorder it to dominant-then-contextual); with several images in a prompt each is reduced on its
    own, its queries its own tokens; with grouped-query attention the metric averages the key heads.
    The paper also describes visual-only attention in the encoder stage, but the reference runs plain
    VisionZip there, which this follows.
    """

    name = "visiondrop"
    paper = PAPER

    dominant: int = 42
    contextual: int = 6
    layers: Sequence[int] | None = None
    stages: Sequence[Sequence[int]] = STAGES
    positions: str = "auto"

    def __post_init__(self) -> None:
        self.dominant = as_int("dominant", self.dominant, 1)
        self.contextual = as_int("contextual", self.contextual, 0)
        self.before = VisionZip(dominant=self.dominant, contextual=self.contextual)
        self.inside = VisionDropLLM(layers=self.layers, stages=self.stages, positions=self.positions)
        self.layers, self.stages = self.inside.layers, self.inside.stages
        super().__post_init__()
