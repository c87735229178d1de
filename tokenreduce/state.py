"""Per-forward reduction state: a fresh object for every forward call, private to the calling thread."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from tokenreduce.core import Selection, restore_tokens, size_bias, take_per_token


@dataclass(frozen=True)
class Record:
    """What one forward call did: token counts, and which original tokens each final token covers.

    :func:`tokenreduce.record` returns the last forward run *by the calling thread*, so threads sharing
    one patched model each see their own.

    ``tokens_per_layer[i]`` is the token count leaving block ``i`` (attention of block ``i`` ran on
    ``input_tokens`` or ``tokens_per_layer[i - 1]``). ``owner [B, N0]`` is, for every original token
    (prefix tokens included), the index of the final token covering it, or -1 where it was dropped.
    ``size [B, N, 1]`` counts the original tokens merged into each final token (``None`` when nothing
    was reduced). ``steps`` are the ``(block, selection)`` pairs applied, in order, which
    :meth:`restore` undoes. Under a method with per-image counts (``variable_counts``), counts are the
    batch's padded lengths and ``size == 0`` marks each row's padding.
    """

    input_tokens: int
    tokens_per_layer: tuple[int, ...]
    num_prefix: int
    owner: Tensor
    size: Tensor | None
    steps: tuple[tuple[int, Selection], ...] = ()

    def restore(self, tokens: Tensor, block: int | None = None, grid: tuple[int, int] | None = None) -> Tensor:
        """``tokens [B, N, C]`` as they left block ``block`` (default: the last) spread back over all
        ``input_tokens`` original positions ``[B, N0, C]`` for dense heads: every reduction up to that
        block undone in reverse (merged tokens copied back to the tokens they cover, a method's own
        reconstruction where it has one), and patches that were dropped filled from the nearest
        covered patch of the ``grid`` (rows, cols) of patch tokens after the prefix (default: square)."""
        last = len(self.tokens_per_layer) - 1 if block is None else block
        expected = self.input_tokens if last < 0 else self.tokens_per_layer[last]
        if tokens.shape[1] != expected:
            raise ValueError(f"tokens must have the {expected} tokens that left block {last}, got {tokens.shape[1]}")
        steps = [selection for layer, selection in self.steps if layer <= last]
        if grid is None:
            side = round((self.input_tokens - self.num_prefix) ** 0.5)
            if side * side != self.input_tokens - self.num_prefix:
                raise ValueError(
                    f"the {self.input_tokens - self.num_prefix} patch tokens are not a square grid; pass grid=(rows, cols)"
                )
            grid = (side, side)
        return restore_tokens(tokens, steps, self.num_prefix, grid)

    def patch_grid(self, patches: Tensor, block: int, grid: tuple[int, int]) -> Tensor:
        """The patch tokens ``patches [B, N - P, C]`` that left block ``block`` (the prefix tokens cut off,
        as ``forward_intermediates`` hands them over) spread back over the ``grid`` (rows, cols) as
        ``[B, C, rows, cols]`` (:meth:`restore`; prefix tokens are never reduced, zeros stand in for them)."""
        full = torch.cat([patches.new_zeros(patches.shape[0], self.num_prefix, patches.shape[-1]), patches], dim=1)
        restored = self.restore(full, block, grid)[:, self.num_prefix :]
        return restored.reshape(patches.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous()

    @property
    def num_tokens(self) -> int:
        """Tokens after the last block."""
        return self.tokens_per_layer[-1] if self.tokens_per_layer else self.input_tokens

    @property
    def source(self) -> Tensor:
        """``[B, N, N0]``: 1 where final token ``n`` covers original token ``j`` (the dense form of ``owner``)."""
        b, n0 = self.owner.shape
        hit = self.owner >= 0
        out = torch.zeros(b, self.num_tokens + 1, n0, device=self.owner.device)
        out.scatter_(1, torch.where(hit, self.owner, self.num_tokens)[:, None, :], 1.0)
        return out[:, : self.num_tokens]


@dataclass
class ForwardState:
    """Token bookkeeping of one forward call, shared by the patched blocks it runs through.

    Created by :meth:`start` at the first block and never shared between calls or threads, so a
    patched model can serve concurrent forwards. The engine follows every :class:`Selection` on it.
    """

    num_prefix: int
    schedule: list[int]  # expected token count after each block
    batch: int
    input_tokens: int
    device: torch.device
    tokens_per_layer: list[int] = field(default_factory=list)
    size: Tensor | None = None  # [B, N, 1] float32; None means all ones
    steps: list[tuple[int, Selection]] = field(default_factory=list)  # (block, selection) applied so far
    q: Tensor | None = None  # queries/keys/values of the block now running, captured on their way to attention
    k: Tensor | None = None
    v: Tensor | None = None
    carry: object = None  # the method's own per-forward value (LayerContext.carry)
    block_input: Tensor | None = None  # the tokens that entered the block now running
    position: Tensor | None = None  # [B, N] long: the original token whose position each token holds; None: its own
    position_steps: int = 0  # steps already followed into position
    image: Tensor | None = None  # [B, C, H, W] the patch embedding's input, for methods with needs_image

    @classmethod
    def start(cls, x: Tensor, num_prefix: int, schedule: list[int]) -> ForwardState:
        """The state for a forward on tokens ``x [B, N0, C]`` with the per-block ``schedule``."""
        return cls(num_prefix=num_prefix, schedule=schedule, batch=x.shape[0], input_tokens=x.shape[1], device=x.device)

    def sizes(self, x: Tensor) -> Tensor:
        """Current sizes ``[B, N, 1]``, materialising ones before the first reduction."""
        if self.size is None:
            return torch.ones(x.shape[0], x.shape[1], 1, device=x.device, dtype=torch.float32)
        return self.size

    def owners(self, after: int | None = None) -> Tensor:
        """``owner [B, N0]`` now, or after block ``after`` (``-1``: before the first block): followed
        through the recorded steps when asked, not on every forward."""
        owner = torch.arange(self.input_tokens, device=self.device).expand(self.batch, -1)
        for layer, selection in self.steps:
            if after is not None and layer > after:
                break
            owner = selection.owners(owner)
        return owner

    def follow_tokens(self, tables: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-token tables (one row per original token after the prefix: rotary embeddings) at the current
        tokens: each takes the row of the original token whose position it holds (:func:`take_per_token`)."""
        # followed through the steps recorded since the last call: free for models without such tables
        for _, selection in self.steps[self.position_steps :]:
            if selection.restores:
                self.position = None
            else:
                slot = selection.slot
                own = torch.arange(slot.shape[1], device=slot.device).expand(slot.shape[0], -1)
                self.position = selection.take(own if self.position is None else self.position)
        self.position_steps = len(self.steps)
        if self.position is None:
            return tables
        return {name: take_per_token(table, self.position, self.num_prefix) for name, table in tables.items()}

    def tokens_after(self, layer: int) -> int:
        """Token count leaving block ``layer`` (``-1``: entering the first block)."""
        return self.input_tokens if layer < 0 else self.tokens_per_layer[layer]

    def attn_bias(self, dtype: torch.dtype) -> Tensor | None:
        """The proportional-attention mask for the current tokens, or ``None`` while all sizes are 1."""
        return None if self.size is None else size_bias(self.size, dtype)

    def follow(self, selection: Selection, x: Tensor, layer: int) -> Tensor:
        """Apply ``selection`` to the current tokens ``x`` in block ``layer``: the new tokens, with sizes
        updated and the step recorded (owners follow it when asked)."""
        self.size = None if selection.restores else selection.sizes(self.sizes(x))
        x = selection.apply(x)
        self.steps.append((layer, selection))
        return x

    def record(self) -> Record:
        return Record(
            input_tokens=self.input_tokens,
            tokens_per_layer=tuple(self.tokens_per_layer),
            num_prefix=self.num_prefix,
            owner=self.owners().detach(),
            size=None if self.size is None else self.size.detach(),
            steps=tuple(self.steps),
        )
