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

    ``attention [B, H, T, N]`` is, per head, the float32 softmax attention of each of the ``T`` prompt
    tokens (the layer's queries) over the ``N`` image features of its row (the layer's keys), under the
    layer's cross-attention mask; ``readers [B, T]`` is True on the tokens that read the images (their
    mask row is not fully masked: Mllama masks every token before a row's first image, padding included).
    """

    layer: int
    attention: Tensor
    readers: Tensor


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
