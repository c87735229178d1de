"""The denoiser form of a method: inside one block of a diffusion UNet or DiT it maps the image tokens to
fewer for the block's attention (and optionally its cross-attention and MLP), and the block's output is
spread back over every token, so block input and output shapes never change."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

from torch import Tensor

from tokenreduce.core import Selection
from tokenreduce.methods.base import Method
from tokenreduce.stages import Stage


class Part(str, Enum):
    """A sub-module of a denoiser block that a reduction can wrap."""

    ATTN = "attn"  # self-attention over the image tokens (joint attention: its image side)
    CROSS_ATTN = "cross_attn"  # cross-attention to the text (the image tokens are its queries)
    MLP = "mlp"  # the block's feed-forward on the image tokens

    def __str__(self) -> str:
        return self.value


@dataclass
class DenoiserContext:
    """What a denoiser method sees at the start of a block.

    ``grid`` is the ``(rows, cols)`` of the block's image tokens (row-major, ``rows * cols == N``);
    ``level`` how far the block's grid is downsampled from the model's finest token grid (1, 2, 4 ...;
    always 1 in a DiT). ``timestep`` is the denoiser's ``timestep`` argument as passed (a 0-d or ``[B]``
    tensor), ``step`` the index of the denoising step in the running generation when the method asks
    for it (:attr:`DenoiserMethod.uses_steps`; counted from timestep changes, so cond and uncond calls
    of one step share it), and ``memory`` the method's object for the whole generation."""

    block: int  # index of this block among the model's token blocks
    depth: int  # token blocks in the model
    level: int
    grid: tuple[int, int]
    timestep: Tensor | None
    step: int | None = None
    memory: Any = None

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass
class Recompute:
    """A block plan of a method with :attr:`DenoiserMethod.recomputes`: across steps, not within one call.

    Every wrapped sub-module computes only the image tokens at ``index`` (``[B, n]`` positions, per
    batch row of the call) and every other token takes that sub-module's output of the last call it
    computed, kept in ``cache``; a self-attention (or the image side of a joint attention) computes
    queries for those tokens only, against the keys and values of every image token (fresh ones for
    the tokens at ``index``, the cached ones for the rest; text tokens are computed in full). With
    ``index=None`` every token is computed as without the method, and the cache is filled.

    ``cache`` belongs to the method (one per block and per batch of rows, e.g. per CFG branch of a split
    call, kept in its generation memory); the engine fills it and reads it back, so its content is the
    engine's: each wrapped sub-module's last image output and, for attention, its image keys and values.
    """

    index: Tensor | None
    cache: dict[Any, Any] = field(default_factory=dict)


class DenoiserMethod(Method):
    """Acts inside the blocks of a diffusion denoiser (UNet, DiT, MMDiT, FLUX).

    At the start of each token block :meth:`plan` returns a :class:`~tokenreduce.core.Selection` of the
    block's image tokens, or ``None`` to leave the block alone. The engine applies it to the input of
    every :attr:`parts` sub-module and spreads the sub-module's output back over all tokens with
    :meth:`Selection.unmerge` (a merged token's output copied to each token merged into it), inside the
    residual branch. With :attr:`kv_only`, the selection builds the keys and values of the block's
    self-attention only: queries stay full, so nothing is spread back (ToDo). With :attr:`recomputes`,
    :meth:`plan` may return a :class:`Recompute` instead: tokens are carried across steps (CAT Pruning)."""

    stage = Stage.DENOISER
    kv_only: ClassVar[bool] = False
    uses_steps: ClassVar[bool] = False  # DenoiserContext.step and memory are filled (the step is read on the host)
    # plan may return a Recompute (requires uses_steps); the adapter checks at apply that it can run one
    recomputes: ClassVar[bool] = False

    def parts(self) -> frozenset[Part]:
        """The sub-modules each selection wraps."""
        return frozenset({Part.ATTN})

    def acts_at(self, level: int) -> bool:
        """Whether blocks at this downsampling level are reduced at all (decided when patching)."""
        return True

    @abstractmethod
    def plan(self, x: Tensor, ctx: DenoiserContext) -> Selection | Recompute | None:
        """How the block's image tokens ``x [B, N, C]`` (its input hidden states) become fewer."""

    def new_memory(self) -> Any:
        """The method's state for one generation (several denoiser calls); ``None`` when it keeps none."""
        return None

    def observe(self, output: Tensor, ctx: DenoiserContext) -> Tensor | None:
        """See the denoiser's output of a call (``[B, C, H, W]`` or packed ``[B, N, C]``), e.g. to score
        the next step; ``ctx.block`` is -1. Called only for methods with ``uses_steps``. A tensor
        returned replaces the call's output (a method reusing outputs across steps); ``None`` keeps it."""
        return None
