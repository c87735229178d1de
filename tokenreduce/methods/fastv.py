"""``fastv``: FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models", ECCV 2024)."""

from __future__ import annotations

from dataclasses import dataclass

from tokenreduce.methods.llm import AttentionRankPrune, check_layer, fraction
from tokenreduce.registry import register_method
from tokenreduce.validate import as_int


@register_method
@dataclass
class FastV(AttentionRankPrune):
    """Before LLM layer ``layer`` (K), keep the ``keep_ratio`` share of each image's tokens that the
    last prompt token attended to most at layer K-1 (softmax over all tokens, mean over heads); the
    rest are gone from layer K on, KV cache included, and kept tokens keep their position ids.

    From the reference (``pkunlp-icler/FastV``, the llava-hf port's ``fastv_forward``): the kept count is
    ``round(image tokens * keep_ratio)`` (the port's ``round(IMG_LEN * (1 - R))``), pruning happens once,
    at the prefill, and decoding attends the pruned set. Choices the reference leaves open: every image
    of a prompt is ranked on its own with the same ratio (the reference has one image per prompt and
    batch 1); the query is each row's last real token, so padding on either side is allowed.
    """

    name = "fastv"
    paper = "Chen et al., An Image is Worth 1/2 Tokens After Layer 2, ECCV 2024"

    layer: int = 2
    keep_ratio: float = 0.5
    positions: str = "keep"

    def __post_init__(self) -> None:
        self.layer = as_int("layer", self.layer, 1)
        self.keep_ratio = fraction("keep_ratio", self.keep_ratio)
        self.check_positions()

    def prune_layers(self, depth: int) -> tuple[int, ...]:
        check_layer("layer", self.layer, depth)
        return (self.layer,)

    def kept(self, tokens: int, stage: int) -> int:
        return self.kept_count(tokens, self.keep_ratio)
