"""The in-LLM form of a method: at some decoder layers of a VLM's LLM, during the prefill, it drops
visual tokens; the layers from there on (and their KV cache) hold the shorter sequence."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from tokenreduce.core import Selection, keep
from tokenreduce.methods.base import Method
from tokenreduce.methods.visual import POSITIONS
from tokenreduce.stages import Stage
from tokenreduce.validate import as_int_tuple, as_real, as_sequence


@dataclass(frozen=True)
class ImageSpan:
    """One image's (or video's) visual tokens in the current sequence: ``length`` tokens from ``start``
    in ``row``. A video's span has its ``frames`` and, while it is whole (before any in-LLM stage
    changed it), ``grid``: the per-frame (rows, cols) of its tokens at the LLM's input, frame-major
    (LLaVA-OneVision's trailing newline token follows its ``frames * rows * cols`` tokens in the span)."""

    row: int
    start: int
    length: int
    frames: int = 1
    grid: tuple[int, int] | None = None


@dataclass
class LLMContext:
    """What an in-LLM method sees at its ``stage``-th pruning layer ``layer`` (restoring layers are not
    stages), for a batch.

    ``hidden [B, L, D]`` is the input of ``layer`` over the current sequence (shorter after an earlier
    stage); ``spans`` are the images' visual tokens in it, each to keep ``keep[i]`` tokens;
    ``attention [B, L]`` is the causal softmax attention of each row's last prompt token to every
    token, averaged over heads, at the method's scoring layer (methods scoring by ``"attention"``) and
    ``keys`` that layer's keys (methods scoring by ``"keys"``); ``mask [B, L]`` is 1 on real tokens.
    """

    layer: int
    stage: int
    hidden: Tensor
    spans: list[ImageSpan]
    keep: list[int]
    attention: Tensor | None
    mask: Tensor
    keys: Tensor | None = None  # [B, H_kv, L, D] the scoring layer's keys, rotary applied
    queries: Tensor | None = None  # [B, H, L, D] its queries, rotary applied (methods scoring by "queries")
    scale: float | None = None  # its softmax scale (methods scoring by "queries")
    scores: list[Tensor] | None = None  # per span, its tokens' scores from its raters' (text or own) attention
    norm: Callable[[Tensor], Tensor] | None = None  # the LLM's final norm
    visual: Tensor | None = None  # [B, L] True on every image's tokens
    memory: list | None = None  # per span, what the method carries between its stages (None before the first)
    masked: Tensor | None = None  # [B, L] True on the tokens earlier stages of a masks-only method hid


class LLMMethod(Method):
    """Acts inside the LLM of a VLM during the prefill: at each layer of :meth:`prune_layers` it keeps
    some of every image's visual tokens (text tokens always stay). Scores come from the queries and keys
    of one layer, computed for the rows needed only (the layers keep SDPA): the layer before the
    pruning layer as it runs (``scores_from = "previous"``, FastV), or the pruning layer's own, computed
    before it runs (``"own"``, PyramidDrop). ``positions`` as for :class:`~tokenreduce.methods.visual.VisualMethod`.
    """

    stage = Stage.LLM
    # the spans the method acts on: image and/or video placeholders; the others pass through unchanged
    modalities: ClassVar[frozenset[str]] = frozenset({"image"})
    scores_from: ClassVar[str] = "previous"
    # or "keys", "queries" (the scoring layer's queries and keys: "previous" only), "raters", "visual"
    # (the attention each image's tokens get from its own tokens' queries: "own" only), or "none" (no
    # scoring layer: the rule needs no scores)
    scores: ClassVar[str] = "attention"
    # True: a pruning layer hides the tokens not kept instead of removing them: they stay in the sequence
    # and the KV cache (positions unchanged) but no later query attends to them (their mask columns
    # are hidden from that layer on, decode steps included). Saves no compute. A later stage selects
    # among the tokens still visible (``LLMContext.masked``), keeping them only (no merging).
    masks_only: ClassVar[bool] = False
    positions: str

    def check_positions(self) -> None:
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")

    @abstractmethod
    def prune_layers(self, depth: int) -> tuple[int, ...]:
        """The decoder layers (0-based, increasing, in ``[1, depth - 1]``) before which tokens are dropped."""

    @abstractmethod
    def kept(self, tokens: int, stage: int) -> int:
        """Visual tokens an image with ``tokens`` at the LLM's input keeps from its ``stage``-th pruning layer on."""

    def restore_layers(self, depth: int) -> dict[int, int]:
        """Pruning layers whose dropped tokens come back: ``{a: b}`` gives layer ``b`` (after ``a``, with no
        pruning layer in between) the sequence layer ``a`` received, each image token rebuilt by
        :meth:`restore`; layers ``a .. b-1`` (and their KV cache) hold the short one. Default: none."""
        return {}

    def restore(self, before: Tensor, selection: Selection, after: Tensor) -> Tensor:
        """One image's tokens ``[1, N, D]`` at a restoring layer, from those entering the pruning layer
        (``before [1, N, D]``), the selection made there and its outputs now (``after [1, K, D]``). By
        default every token moves by the update of the output it fed or was assigned to
        (:meth:`~tokenreduce.core.Selection.unmerge`: ``x + (y_out - y_out_then)``); kept tokens of a
        pure pruning take their outputs exactly."""
        out = before + selection.unmerge(after - selection.apply(before))
        if selection.gather_only:
            out[:, selection.index[0]] = after
        return out

    def decode_layer(self, depth: int) -> int | None:
        """The decoder layer (of an LLM of ``depth`` layers) from which, on decode steps, the layers attend
        to a selection of each span's cached tokens (:meth:`decode_keep`) and to every other cached
        entry; ``None`` (the default): decoding reads what the prefill left."""
        return None

    def decode_keep(self, attention: Tensor, previous: Tensor | None, kept: Tensor | None) -> Tensor:
        """On a decode step, the tokens of one span (its indices, increasing) that the layers from
        :meth:`decode_layer` on attend to: from ``attention [n]``, the current token's attention to the
        span's ``n`` cached tokens at the layer before (softmax over all entries, mean over heads),
        ``previous``, the same at the previous step (``None`` at the first), and ``kept``, the last
        step's selection (``None`` at the first)."""
        raise NotImplementedError(f"{self.name!r} does not select cache entries on decode steps")

    def text_raters(self, hidden: Tensor, spans: list[ImageSpan], mask: Tensor) -> list[Tensor] | None:
        """Per image, the positions of the text tokens whose attention rows score it (methods scoring by
        ``"raters"``), from the LLM's input ``hidden [B, L, D]``."""
        return None

    @abstractmethod
    def select(self, ctx: LLMContext) -> list[Selection]:
        """Per span of ``ctx.spans``, a one-row :class:`~tokenreduce.core.Selection` over its tokens:
        usually the ``ctx.keep[i]`` kept ones in order, possibly followed by merged ones."""


def check_restores(restores: dict[int, int], prune: tuple[int, ...], depth: int) -> None:
    """Each restoring layer follows its pruning layer, with no other pruning layer in between."""
    for a, b in restores.items():
        check_layer("restoring layer", b, depth)
        if a not in prune or b <= a or any(a < p < b for p in prune):
            raise ValueError(
                f"a restoring layer must follow its pruning layer with none in between (pruning layers {prune}), got {a} -> {b}"
            )


def check_layer(name: str, layer: int, depth: int) -> None:
    if not 1 <= layer <= depth - 1:
        raise ValueError(f"{name} must be in [1, {depth - 1}] for an LLM of {depth} layers, got {layer}")


def fraction(name: str, value: object) -> float:
    return as_real(name, value, 0, 1, low_open=True)


def check_stages(ratios: object, layers: object) -> tuple[tuple[float, ...], tuple[int, ...] | None]:
    """Staged pruning's config: ``ratios``, a non-empty non-increasing sequence of keep fractions in
    (0, 1], and ``layers``, ``None`` or one increasing layer index per ratio."""
    items = as_sequence("ratios", ratios, "fractions in (0, 1]")
    ratios = tuple(fraction(f"ratios[{i}]", r) for i, r in enumerate(items))
    if not ratios or any(b > a for a, b in zip(ratios, ratios[1:])):
        raise ValueError(f"ratios must be a non-empty, non-increasing sequence of fractions in (0, 1], got {ratios}")
    if layers is not None:
        layers = as_int_tuple("layers", layers, 1)
        if len(layers) != len(ratios) or list(layers) != sorted(set(layers)):
            raise ValueError(f"layers must be {len(ratios)} increasing layer indices (one per ratio), got {layers}")
    return ratios, layers


def stage_layers(layers: tuple[int, ...] | None, count: int, depth: int) -> tuple[int, ...]:
    """``layers`` checked against an LLM of ``depth`` layers, or by default PyramidDrop's ``count``
    stage ends scaled to the depth: ``(j + 1) * depth // (count + 1)``, at least 1."""
    if layers is None:
        layers = tuple(sorted({max(1, (j + 1) * depth // (count + 1)) for j in range(count)}))
        if len(layers) != count:
            raise ValueError(f"an LLM of {depth} layers cannot hold {count} pruning stages; pass fewer ratios")
        return layers
    for layer in layers:
        check_layer("layers", layer, depth)
    return tuple(layers)


@dataclass
class AttentionRankPrune(LLMMethod):
    """Keep each image's tokens that the last prompt token attends to most (mean over heads), in their
    order: the rule FastV and PyramidDrop share."""

    def select(self, ctx: LLMContext) -> list[Selection]:
        assert ctx.attention is not None
        out = []
        for span, k in zip(ctx.spans, ctx.keep):
            scores = ctx.attention[span.row, span.start : span.start + span.length]
            out.append(keep(scores.topk(k).indices.sort().values[None], span.length))
        return out

    def kept_count(self, tokens: int, ratio: float) -> int:
        return min(tokens, max(1, round(ratio * tokens)))
