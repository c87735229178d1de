"""``pdrop``: PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction", CVPR 2025)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenreduce.methods.llm import AttentionRankPrune, check_stages, stage_layers
from tokenreduce.registry import register_method

REFERENCE_DEPTH = 32  # LLaVA-1.5-7B's Vicuna, where the reference's stage ends [8, 16, 24] sit


@register_method
@dataclass
class PyramidDrop(AttentionRankPrune):
    """At the input of each stage-end layer ``layers[j]``, keep ``ratios[j]`` of each image's visual
    tokens (a share of the tokens the image had at the LLM's input), ranked by the attention of the
    last prompt token (that layer's own queries and keys after its input norm and rotary embedding,
    softmax, mean over heads); each stage drops from the tokens the previous one kept.

    From the reference (``Cooperx521/PyramidDrop`` ``pdrop_rank_drop``): ``layers=(8, 16, 24)``,
    ``ratios=(0.5, 0.25, 0.125)``, positions re-indexed after each drop (``positions="auto"``: so on
    1-D positions; Qwen's M-RoPE ids keep theirs), per-sample selection re-padded to the longest row.
    When ``layers`` is not given the reference's ends scale to the model's depth (``8 * depth // 32``...).
    Decoding continues each layer's own re-indexed positions: a layer's new token sits right after the
    tokens its cache holds.
    """

    name = "pdrop"
    paper = (
        "Xing et al., PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual "
        "Redundancy Reduction, CVPR 2025"
    )
    scores_from = "own"

    layers: Sequence[int] | None = None
    ratios: Sequence[float] = (0.5, 0.25, 0.125)
    positions: str = "auto"

    def __post_init__(self) -> None:
        self.ratios, self.layers = check_stages(self.ratios, self.layers)
        self.check_positions()

    def prune_layers(self, depth: int) -> tuple[int, ...]:
        return stage_layers(self.layers, len(self.ratios), depth)

    def kept(self, tokens: int, stage: int) -> int:
        return self.kept_count(tokens, self.ratios[stage])
