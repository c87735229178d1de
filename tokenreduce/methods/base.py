"""The method interface: a validated dataclass config acting at one stage of a model; and the
encoder-stage form, which plans a per-block schedule and selects tokens after each block's attention."""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor

from tokenreduce.core import (
    Selection,
    attention_probs,
    cls_attention,
    keep,
    keep_and_fuse,
    keep_indices,
    patchify,
    received_attention,
    split_keep_drop,
)
from tokenreduce.stages import Stage
from tokenreduce.validate import as_int_tuple, as_real


class Hook(str, Enum):
    """Where in a block an encoder method reduces tokens."""

    START = "start"  # the block input, before attention (B); q/k/v are this block's, projected from it
    ATTN = "attn"  # after the attention residual, before the MLP (A); q/k/v are those attention used
    END = "end"  # after the MLP (E, the next block's input); q/k/v are those this block's attention used

    def __str__(self) -> str:
        return self.value


@dataclass
class LayerContext:
    """What a method sees at its hook point in block ``layer``.

    ``q``/``k``/``v`` are ``[B, H, N, D]`` (queries and keys after any qk-norm and rotary embedding, as
    the softmax sees them), aligned with the tokens being reduced. At :attr:`Hook.START` they are this
    block's, projected from its input, when the method sets ``start_qkv`` and the block reduces; else those the previous
    block's attention used (``None`` at block 0).
    ``attn_bias`` is the additive mask that attention used (or will use, at the start). ``depth`` is the
    encoder's block count. For a method with ``needs_image``, ``image`` is the input of the model's patch
    embedding ``[B, C, H, W]`` (the normalised pixels, as the model sees them; a video's tubelets as one
    tall image, :func:`~tokenreduce.core.tubelets_as_image`) and ``patch_size`` its ``(height, width)``;
    ``None`` when the forward did not pass through the patch embedding."""

    layer: int
    num_prefix: int
    num_out: int  # token count the schedule asks this layer to leave
    q: Tensor | None
    k: Tensor | None
    scale: float
    attn_bias: Tensor | None
    size: Tensor | None  # [B, N, 1] original tokens per token; None while all are 1
    v: Tensor | None = None
    hook: Hook = Hook.ATTN
    carry: Any = None  # the method's own value for this forward call, kept from block to block
    block_input: Tensor | None = None  # [B, N_in, C] the tokens that entered this block (before any reduction in it)
    depth: int | None = None  # blocks in the encoder (``layer`` counts from 0 to ``depth - 1``)
    image: Tensor | None = None  # [B, C, H, W] the patch embedding's input, for methods with needs_image
    patch_size: tuple[int, int] | None = None  # (height, width) of a patch, with image
    input_tokens: int = 0  # tokens entering the first block in this forward call (depth and this fix the schedule)

    def metric(self) -> Tensor:
        """Keys averaged over heads ``[B, N, D]``: the similarity metric of ToMe."""
        return self.k.mean(dim=1)

    def cls_attention(self) -> Tensor:
        """Head-averaged softmax attention of the CLS token (position 0) to every token ``[B, N]``."""
        return cls_attention(self.q, self.k, self.scale, self.attn_bias)

    def attention(self) -> Tensor:
        """The full softmax attention ``[B, H, N, N]`` (float32), recomputed from ``q``/``k`` beside the
        layer's own fused attention: ``O(N^2)``, for methods that need every query's row."""
        return attention_probs(self.q, self.k, self.scale, self.attn_bias)

    def received(self) -> Tensor:
        """Attention each token receives, averaged over heads and all queries ``[B, N]`` (float32)."""
        return received_attention(self.q, self.k, self.scale, self.attn_bias)

    def sizes(self, x: Tensor) -> Tensor:
        """``size`` with ones materialised ``[B, N, 1]`` (float32)."""
        if self.size is None:
            return x.new_ones(x.shape[0], x.shape[1], 1, dtype=torch.float32)
        return self.size

    @property
    def grid(self) -> tuple[int, int] | None:
        """``(rows, cols)`` of the patch grid, from the captured image (``None`` without one)."""
        if self.image is None or self.patch_size is None:
            return None
        return self.image.shape[-2] // self.patch_size[0], self.image.shape[-1] // self.patch_size[1]

    def pixel_patches(self) -> Tensor:
        """The raw pixels of each patch token ``[B, P, C * ph * pw]``, in the order of the patch tokens
        (row-major), for a method with ``needs_image``."""
        if self.image is None or self.patch_size is None:
            raise ValueError(
                "this method reads the input pixels, which were not captured: run the patched model on images "
                "(its patch embedding keeps them), not on ready-made tokens"
            )
        return patchify(self.image, self.patch_size)


class Method(ABC):
    """A training-free token reduction method acting at one :class:`~tokenreduce.stages.Stage`.
    Subclasses are dataclasses holding their validated config; they produce
    :class:`~tokenreduce.core.Selection` objects and never touch a model or its bookkeeping."""

    name: ClassVar[str]
    stage: ClassVar[Stage]
    paper: ClassVar[str] = ""
    needs_cls_token: ClassVar[bool] = False

    @property
    def unmerges_in_llm(self) -> bool:
        """Whether the VLM's LLM attention runs over every original token while the rest of each layer
        reads the reduced ones (DyMU's virtual token unmerging)."""
        return False

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{self.name}({args})"


@dataclass(frozen=True)
class Budget:
    """The config knob that sets how much compute a method keeps, for matching methods at equal
    FLOPs: ``param`` ranges over ``[low, high]`` (integers when ``integer``), and the model's MACs grow
    with it when ``increasing`` (a keep rate) or shrink (tokens merged per block)."""

    param: str
    low: float
    high: float
    integer: bool = False
    increasing: bool = True


class EncoderMethod(Method):
    """Acts inside the blocks of a vision encoder.

    ``schedule`` plans, from the input token count alone, how many tokens leave each block; ``select``
    then says, at the method's :attr:`hook` in each block, which tokens become which (a
    :class:`~tokenreduce.core.Selection` with exactly ``ctx.num_out`` outputs, at most that many with
    ``variable_counts``). The engine applies it to the tokens and follows it on sizes and owners.
    """

    stage = Stage.ENCODER
    prop_attn: bool = False  # add log(size) to attention logits (proportional attention)
    hook: ClassVar[Hook] = Hook.ATTN
    start_qkv: ClassVar[bool] = False  # at Hook.START of a block that reduces, project its q/k/v from its input
    edits_attention: ClassVar[bool] = False  # every block's attention map comes from attend() (eager)
    needs_image: ClassVar[bool] = False  # the patch embedding's input reaches LayerContext.image
    budget: ClassVar[Budget | None] = None  # the knob the matched-FLOPs bench preset turns
    # Counts depend on the image: a selection may leave fewer than ctx.num_out tokens (the schedule gives
    # upper bounds), rows padded to the longest with tokens of size 0 (no input feeds them; log(size) masks
    # them as keys, size-weighted pooling ignores them, owners never point to them). Eager only.
    variable_counts: ClassVar[bool] = False

    @abstractmethod
    def schedule(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        """Token count after each of ``depth`` blocks, for ``num_tokens`` input tokens."""

    @abstractmethod
    def select(self, x: Tensor, ctx: LayerContext) -> Selection | None:
        """How ``x [B, N, C]`` becomes ``ctx.num_out`` tokens; ``None`` when nothing changes here."""

    def attend(self, ctx: LayerContext) -> Tensor:
        """With ``edits_attention``: the softmax probabilities ``[B, H, N, N]`` block ``ctx.layer``'s
        attention applies to its values, from its ``q``/``k``/``v`` (``ctx.hook`` is ATTN, ``ctx.num_out``
        the count the block will leave). The default is the block's own attention."""
        return ctx.attention()


def as_layers(layers: object, name: str = "layers") -> tuple[int, ...] | None:
    """A method's ``layers`` option checked: ``None`` (its default placement) or a non-empty sequence of
    block indices >= 0."""
    if layers is None:
        return None
    layers = as_int_tuple(name, layers, 0)
    if not layers:
        raise ValueError(f"{name} must be a non-empty sequence of block indices >= 0, got an empty one")
    return layers


def layers_for_depth(
    layers: tuple[int, ...] | None, depth: int, default: Sequence[int] = (3, 6, 9), name: str = "layers"
) -> tuple[int, ...]:
    """The sorted blocks a method acts at in a ``depth``-block model: ``layers`` (checked against the
    depth), or ``default``, block indices of a 12-block model, scaled to the depth (``i * depth // 12``)."""
    if layers is None:
        return tuple(sorted({i * depth // 12 for i in default}))
    bad = [i for i in layers if i >= depth]
    if bad:
        raise ValueError(f"{name} must be block indices in [0, {depth - 1}] for this model, got {bad}")
    return tuple(sorted(set(layers)))


@dataclass
class PruneAtLayers(EncoderMethod):
    """Keep the ``keep_rate`` best-scored non-prefix tokens at a few layers; optionally fuse the rest.
    Tokens are scored by the CLS token's attention unless a subclass overrides :meth:`scores`.

    ``layers=None`` places reductions at layers 3, 6 and 9 of a 12-block model (EViT's DeiT-S
    setting: the 4th, 7th and 10th blocks), scaled to the model's depth.
    """

    keep_rate: float = 0.7
    layers: Sequence[int] | None = None

    budget = Budget("keep_rate", 0.0, 1.0)
    fuse: ClassVar[bool] = False  # fuse the dropped tokens into one (EViT) instead of discarding them
    needs_cls_token: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.keep_rate = as_real("keep_rate", self.keep_rate, 0, 1, low_open=True)
        self.layers = as_layers(self.layers)

    def reduction_layers(self, depth: int) -> tuple[int, ...]:
        return layers_for_depth(self.layers, depth)

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
