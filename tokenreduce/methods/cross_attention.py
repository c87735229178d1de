"""The cross-attention form of a method: for a VLM whose LLM reads the image features through
cross-attention layers (Llama 3.2 Vision) rather than as tokens of its sequence, it chooses, during
the prefill, which image features the cross-attention layers keep as keys and values."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

from torch import Tensor

from tokenreduce.core import Selection
from tokenreduce.methods.base import Method
from tokenreduce.stages import Stage


@dataclass
class CrossAttentionContext:
    """What a cross-attention method sees at the cross-attention layer ``layer`` that chooses, for a batch.

    ``received [B, H, N]`` is, per head, the softmax attention each of a row's ``N`` image features
    receives from the prompt tokens that read the images (the layer's queries and keys, under its
    cross-attention mask), summed over those tokens: the tokens whose mask row is not fully masked
    (Mllama masks every token before a row's first image, padding included).
    """

    layer: int
    received: Tensor


class CrossAttentionMethod(Method):
    """Acts on the image features a cross-attention LLM reads: at its first cross-attention layer,
    during the prefill, it keeps some of each row's features; from then on every cross-attention
    layer's keys and values (and their KV cache) come from the kept ones only."""

    stage = Stage.LLM

    @abstractmethod
    def select(self, ctx: CrossAttentionContext) -> list[Selection]:
        """Per batch row, a one-row :class:`~tokenreduce.core.Selection` keeping some of its ``N``
        features (rows may keep different counts)."""

    @abstractmethod
    def describe_rule(self) -> str:
        """One line for :func:`tokenreduce.describe`: what the method keeps."""
