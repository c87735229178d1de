"""The method interface: a validated dataclass config acting at one stage of a model; and the
encoder-stage form, which plans a per-block schedule and selects tokens after each block's attention."""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from tokenreduce.core import Selection, cls_attention, keep, keep_and_fuse, keep_indices, split_keep_drop
from tokenreduce.stages import Stage
from tokenreduce.validate import as_int_tuple, as_real


@dataclass
class LayerContext:
    """What a method sees at the hook point of block ``layer``: after attention, before the MLP."""

    layer: int
    num_prefix: int
    num_out: int  # token count the schedule asks this layer to leave
    q: Tensor  # [B, H, N, D] queries after qk-norm
    k: Tensor  # [B, H, N, D] keys after qk-norm
    scale: float
    attn_bias: Tensor | None  # the additive mask this layer's attention used
    size: Tensor | None  # [B, N, 1] original tokens per token; None while all are 1

    def metric(self) -> Tensor:
        """Keys averaged over heads ``[B, N, D]``: the similarity metric of ToMe."""
        return self.k.mean(dim=1)

    def cls_attention(self) -> Tensor:
        """Head-averaged softmax attention of the CLS token (position 0) to every token ``[B, N]``."""
        return cls_attention(self.q, self.k, self.scale, self.attn_bias)


class Method(ABC):
    """A training-free token reduction method acting at one :class:`~tokenreduce.stages.Stage`.
    Subclasses are dataclasses holding their validated config; they produce
    :class:`~tokenreduce.core.Selection` objects and never touch a model or its bookkeeping."""

    name: ClassVar[str]
    stage: ClassVar[Stage]
    paper: ClassVar[str] = ""
    needs_cls_token: ClassVar[bool] = False

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{self.name}({args})"


class EncoderMethod(Method):
    """Acts inside the blocks of a vision encoder.

    ``schedule`` plans, from the input token count alone, how many tokens leave each block; ``select``
    then says, at each block, which tokens become which (a :class:`~tokenreduce.core.Selection` with
    exactly ``ctx.num_out`` outputs). The engine applies it to the tokens and follows it on sizes and
    owners.
    """

    stage = Stage.ENCODER
    prop_attn: bool = False  # add log(size) to attention logits (proportional attention)

    @abstractmethod
    def schedule(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        """Token count after each of ``depth`` blocks, for ``num_tokens`` input tokens."""

    @abstractmethod
    def select(self, x: Tensor, ctx: LayerContext) -> Selection | None:
        """How ``x [B, N, C]`` becomes ``ctx.num_out`` tokens; ``None`` when nothing changes here."""


@dataclass
class PruneAtLayers(EncoderMethod):
    """Keep the ``keep_rate`` best-scored non-prefix tokens at a few layers; optionally fuse the rest.
    Tokens are scored by the CLS token's attention unless a subclass overrides :meth:`scores`.

    ``layers=None`` places reductions at layers 3, 6 and 9 of a 12-block model (EViT's DeiT-S
    setting: the 4th, 7th and 10th blocks), scaled to the model's depth.
    """

    keep_rate: float = 0.7
    layers: Sequence[int] | None = None

    fuse: ClassVar[bool] = False  # fuse the dropped tokens into one (EViT) instead of discarding them
    needs_cls_token: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.keep_rate = as_real("keep_rate", self.keep_rate, 0, 1, low_open=True)
        if self.layers is not None:
            self.layers = as_int_tuple("layers", self.layers, 0)
            if not self.layers:
                raise ValueError("layers must be a non-empty sequence of block indices >= 0, got an empty one")

    def reduction_layers(self, depth: int) -> tuple[int, ...]:
        if self.layers is None:
            return tuple(sorted({i * depth // 12 for i in (3, 6, 9)}))
        bad = [i for i in self.layers if i >= depth]
        if bad:
            raise ValueError(f"layers must be block indices in [0, {depth - 1}] for this model, got {bad}")
        return tuple(sorted(set(self.layers)))

    def schedule(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        layers = set(self.reduction_layers(depth))
        n, out = num_tokens, []
        for i in range(depth):
            if i in layers:
                kept = math.ceil(self.keep_rate * (n - num_prefix))
                dropped = n - num_prefix - kept
                n = num_prefix + kept + (1 if self.fuse and dropped > 0 else 0)
            out.append(n)
        return out

    def scores(self, ctx: LayerContext) -> Tensor:
        """One score per non-prefix token ``[B, N - num_prefix]``; the highest are kept."""
        return ctx.cls_attention()[:, ctx.num_prefix :]

    def select(self, x: Tensor, ctx: LayerContext) -> Selection | None:
        n, p = x.shape[1], ctx.num_prefix
        if ctx.num_out == n:
            return None
        scores = self.scores(ctx)
        if not self.fuse:
            return keep(keep_indices(scores, ctx.num_out - p, p), n)
        # The fused token is the score-weighted sum of the dropped tokens (EViT: weights are the
        # CLS attention, not renormalised), appended after the kept ones.
        kept, dropped = split_keep_drop(scores, ctx.num_out - p - 1, p)
        return keep_and_fuse(kept, dropped, scores.gather(1, dropped - p), n)
