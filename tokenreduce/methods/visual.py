"""The pre-LLM form of a method: it selects among the visual tokens of each image before the LLM."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from tokenreduce.core import Selection, received_attention
from tokenreduce.methods.base import Method
from tokenreduce.stages import Stage
from tokenreduce.validate import as_int, as_real

POSITIONS = ("auto", "keep", "reindex")


@dataclass(frozen=True)
class AnyResLayout:
    """Where each token of an AnyRes image's packed prompt span comes from (LLaVA-NeXT, OneVision): the
    base image (thumbnail) first, then the crops' tokens left after unpadding, row by row, each row
    ended by a newline token.

    ``part [L]``: 0 for the base image, ``1 + i`` for crop ``i`` (row-major in the crop grid), -1 for a
    newline token; ``row``/``col`` ``[L]``: the token's patch, in the base image's own ``side x side``
    grid or in the grid of all crops (``crops[0] * side`` rows by ``crops[1] * side`` columns), -1 on
    newlines (where OneVision downscales the unpadded crops, the nearest patch).
    """

    part: Tensor  # [L] long
    row: Tensor  # [L] long
    col: Tensor  # [L] long
    crops: tuple[int, int]  # (rows, cols) of the crop grid
    side: int  # patches per side of the base image and of each crop
    tower_images: int  # images the vision tower encodes for this one: the base image and every crop


@dataclass(frozen=True)
class VideoLayout:
    """A video's tokens as the method sees them: ``frames`` frames of ``grid`` (rows, cols) tokens each, frame-major
    (token ``t * rows * cols + r * cols + c``)."""

    frames: int
    grid: tuple[int, int]

    @property
    def tokens(self) -> int:
        """The video's tokens: ``frames * rows * cols``."""
        return self.frames * self.grid[0] * self.grid[1]


@dataclass
class VisualContext:
    """What a pre-LLM method sees: the visual tokens of ``M`` images that have the same count ``N``.

    ``features`` are in the method's :attr:`VisualMethod.space`: the projected tokens the LLM will read,
    or the vision encoder's hidden states at the layer the VLM reads (then with the class token in front
    when the encoder has one: ``num_prefix`` is 1). ``q``/``k`` are that layer's queries and keys
    ``[M, H, N * group, D]`` when the method asks for attention, else ``None``.

    ``text [M, T, D']`` holds, for a method with :attr:`VisualMethod.needs_text`, the text of each
    image's own prompt in the LLM's input-embedding space (the model's input embedding of its
    ``input_ids``, as the LLM reads them): every token of that prompt except image and video
    placeholders and padding, in prompt order, packed to the front; ``text_mask [M, T]`` is True on
    them and False on the zero rows that pad prompts of fewer text tokens (``T`` is the longest, at
    least 1: a prompt of image tokens alone has its one row masked). Both are ``None`` where no
    prompt is known (features computed alone, vision-space methods).

    ``paired_text [M, P, D']`` and ``paired_mask [M, P]`` hold, with ``text``, each image's paired text
    in an interleaved (multi-image) prompt: the text tokens after the image's placeholder run up to the
    next image's (or the prompt's end), packed the same way; an image followed directly by another has
    no paired text (its mask all False).

    ``cls_attention [M, N]`` holds, for a method with :attr:`VisualMethod.needs_cls_attention`, the
    class token's softmax attention (averaged over heads) to each of the ``N`` tokens at the vision
    layer the VLM reads, the tokens aligned with ``features``.

    ``project`` is, for a vision-space method with :attr:`VisualMethod.needs_projector`, the VLM's own
    token-wise projector as a callable ``[..., n, C] -> [..., n, D]`` on vision features shaped like
    ``features`` (the tokens the VLM projects: the class token is the method's to drop or keep); it
    runs the projector's forward and has no side effects.

    ``anyres`` gives, for a method with :attr:`VisualMethod.needs_anyres`, the layout of the ``N``
    tokens, which are then one AnyRes image's packed span (the same for all ``M`` images); its
    ``cls_attention`` is then each token's own crop's (or the base image's) class-token attention at
    that patch, 0 on newline tokens.

    ``video`` is set when the ``M`` rows are videos (of a method whose :attr:`VisualMethod.modalities`
    hold ``"video"``): ``features [M, frames * rows * cols, D]`` are their tokens, frame-major, all with
    this layout, and ``grid`` is the per-frame grid.
    """

    features: Tensor  # [M, N, D]
    keep: int  # outputs to produce per image
    num_prefix: int  # leading tokens that are not image patches (a class token)
    grid: tuple[int, int] | None  # (rows, cols) of the patch tokens, when they form a grid
    q: Tensor | None = None
    k: Tensor | None = None
    scale: float | None = None
    group: int = 1  # consecutive q/k rows per token: Qwen's patch merger joins 2x2 patches into one
    shallow_q: Tensor | None = None  # the queries and keys of the method's second vision layer (VScan)
    shallow_k: Tensor | None = None
    text: Tensor | None = None  # [M, T, D']
    text_mask: Tensor | None = None  # [M, T] bool
    paired_text: Tensor | None = None  # [M, P, D']
    paired_mask: Tensor | None = None  # [M, P] bool
    cls_attention: Tensor | None = None  # [M, N]
    project: Callable[[Tensor], Tensor] | None = None  # the VLM's projector, for needs_projector
    anyres: AnyResLayout | None = None
    video: VideoLayout | None = None

    def projector(self, method: str) -> Callable[[Tensor], Tensor]:
        """The VLM's projector (see :attr:`project`); raises when this call has none (``method`` names
        the method that needs one)."""
        if self.project is None:
            raise ValueError(
                f"method {method!r} runs the VLM's projector on perturbed features, and this call has none: apply it to "
                "a whole VLM with a token-wise projector (LLaVA family), not to image features alone"
            )
        return self.project

    def prompt_text(self, method: str) -> tuple[Tensor, Tensor]:
        """``(text [M, T, D'], text_mask [M, T])``; raises when this call has no prompt (``method``
        names the method that needs one)."""
        if self.text is None or self.text_mask is None:
            raise ValueError(
                f"method {method!r} reads the prompt's text, and this call has none: apply it to a whole VLM and "
                "call the model (or generate) with input_ids, not to image features alone"
            )
        return self.text, self.text_mask

    def received(self) -> Tensor:
        """Softmax attention each token receives, averaged over heads, all queries and its group's
        rows: ``[M, N]`` (the saliency of towers without a class token)."""
        return _pool(received_attention(self.q, self.k, self.scale), self.group)

    def key_metric(self) -> Tensor:
        """The layer's keys averaged over heads and over each token's group: ``[M, N, D]``."""
        return _pool(self.k.mean(dim=1), self.group)


def _pool(x: Tensor, group: int) -> Tensor:
    return x if group == 1 else x.unflatten(1, (-1, group)).mean(dim=2)


@dataclass
class VisualMethod(Method):
    """Acts on the visual tokens of a VLM before its LLM: one :class:`~tokenreduce.core.Selection` per
    image, applied to the tokens in :attr:`space`; the LLM then reads fewer tokens.

    The budget is ``keep_ratio`` (a fraction of each image's tokens, rounded) or ``keep_tokens`` (per
    image), not both; with neither, the method's own default (``default_keep_ratio``, or a form of its
    own such as VisionZip's dominant + contextual counts). ``positions`` says which position ids
    the kept tokens get in the LLM: ``"keep"`` their original ones (gaps where tokens went),
    ``"reindex"`` consecutive ones (as when tokens are dropped before the LLM and it numbers what it
    gets), ``"auto"`` reindex where positions are a plain count and keep where they encode the image
    grid (Qwen's M-RoPE).
    """

    stage = Stage.PRE_LLM
    space: ClassVar[str] = "projected"  # or "vision": the encoder's hidden states before the projector
    needs_attention: ClassVar[bool] = False  # wants q/k of the vision layer the VLM reads
    needs_text: ClassVar[bool] = False  # wants each image's prompt text (VisualContext.text); projected space only
    needs_cls_attention: ClassVar[bool] = False  # wants VisualContext.cls_attention; projected space only
    needs_projector: ClassVar[bool] = False  # wants VisualContext.project; vision space, token-wise projectors only
    needs_anyres: ClassVar[bool] = False  # selects among AnyRes packed spans (VisualContext.anyres) only
    default_keep_ratio: ClassVar[float | None] = 0.25
    # the inputs the method acts on, "image" and/or "video"; the others pass through unchanged
    modalities: ClassVar[frozenset[str]] = frozenset({"image"})

    keep_ratio: float | None = None
    keep_tokens: int | None = None
    positions: str = "auto"

    def __post_init__(self) -> None:
        if self.keep_ratio is not None and self.keep_tokens is not None:
            raise ValueError(
                f"pass keep_ratio or keep_tokens, not both (got keep_ratio={self.keep_ratio!r}, keep_tokens={self.keep_tokens!r})"
            )
        if self.keep_tokens is not None:
            self.keep_tokens = as_int("keep_tokens", self.keep_tokens, 1)
        elif self.keep_ratio is not None:
            self.keep_ratio = as_real("keep_ratio", self.keep_ratio, 0, 1, low_open=True)
        elif self.default_keep_ratio is not None and not self.has_own_budget():
            self.keep_ratio = self.default_keep_ratio
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")

    def has_own_budget(self) -> bool:
        """Whether the config gives the budget in the method's own form (not keep_ratio/keep_tokens)."""
        return False

    def num_kept(self, num_tokens: int, grid: tuple[int, int] | None) -> int:
        """Tokens kept per image of ``num_tokens`` visual tokens (laid out on ``grid``, when known)."""
        if self.keep_tokens is not None:
            if self.keep_tokens > num_tokens:
                raise ValueError(
                    f"keep_tokens must be in [1, {num_tokens}] for images of {num_tokens} tokens, got {self.keep_tokens}"
                )
            return self.keep_tokens
        return min(num_tokens, max(1, round(self.keep_ratio * num_tokens)))

    def num_kept_video(self, layout: VideoLayout) -> int:
        """Tokens kept of one video laid out as ``layout`` (methods whose :attr:`modalities` hold
        ``"video"``): a function of the layout and the config only, so that videos of one layout keep
        equal counts."""
        return self.num_kept(layout.tokens, None)

    def shallow_layer(self, depth: int) -> int | None:
        """A second layer (0-based, of a vision tower of ``depth`` layers) whose queries and keys the
        method also reads (``VisualContext.shallow_q``/``shallow_k``), or ``None``."""
        return None

    def num_kept_anyres(self, layout: AnyResLayout) -> int:
        """Tokens kept of an AnyRes span laid out as ``layout``, for methods with :attr:`needs_anyres`."""
        raise NotImplementedError(f"{self.name!r} does not select among AnyRes spans")

    def summary_outputs(self, keep: int) -> int:
        """How many trailing outputs of a selection of ``keep`` summarise other tokens rather than
        stand in their place (VisionZip's contextual tokens): where an image's crops are packed into
        one span (AnyRes) they follow the tokens in place, which take the image's spatial order."""
        return 0

    @abstractmethod
    def select(self, ctx: VisualContext) -> Selection:
        """``ctx.features [M, N, D] -> ctx.keep`` tokens per image."""
