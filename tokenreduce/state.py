"""Per-forward reduction state: a fresh object for every forward call, private to the calling thread."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from tokenreduce.core import fuse_tokens, gather_tokens, size_bias


@dataclass(frozen=True)
class Record:
    """What one forward call did: token counts and, when traced, what each final token covers.

    :func:`tokenreduce.record` returns the last forward run *by the calling thread*, so threads sharing
    one patched model each see their own.

    ``tokens_per_layer[i]`` is the token count leaving block ``i`` (attention of block ``i`` ran on
    ``input_tokens`` or ``tokens_per_layer[i - 1]``). ``size [B, N, 1]`` counts the original tokens
    merged into each token (``None`` when nothing was reduced); ``source [B, N, N0]`` is 1 where final
    token ``n`` covers original token ``j`` (prefix tokens included), or ``None`` without ``trace_source``.
    """

    input_tokens: int
    tokens_per_layer: tuple[int, ...]
    num_prefix: int
    size: Tensor | None
    source: Tensor | None


@dataclass
class ForwardState:
    """Token bookkeeping of one forward call, shared by the patched blocks it runs through.

    Created by :meth:`start` at the first block and never shared between calls or threads, so a
    patched model can serve concurrent forwards. Methods read and update it through ``reduce``.
    """

    num_prefix: int
    schedule: list[int]  # expected token count after each block
    input_tokens: int
    tokens_per_layer: list[int] = field(default_factory=list)
    size: Tensor | None = None  # [B, N, 1] float32; None means all ones
    source: Tensor | None = None  # [B, N, N0]
    q: Tensor | None = None  # queries/keys of the block now running, captured on their way to attention
    k: Tensor | None = None

    @classmethod
    def start(cls, x: Tensor, num_prefix: int, schedule: list[int], trace_source: bool) -> ForwardState:
        """The state for a forward on tokens ``x [B, N0, C]`` with the per-block ``schedule``."""
        source = None
        if trace_source:
            source = torch.eye(x.shape[1], device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1)
        return cls(num_prefix=num_prefix, schedule=schedule, input_tokens=x.shape[1], source=source)

    def sizes(self, x: Tensor) -> Tensor:
        """Current sizes ``[B, N, 1]``, materialising ones before the first reduction."""
        if self.size is None:
            return torch.ones(x.shape[0], x.shape[1], 1, device=x.device, dtype=torch.float32)
        return self.size

    def attn_bias(self, dtype: torch.dtype) -> Tensor | None:
        """The proportional-attention mask for the current tokens, or ``None`` while all sizes are 1."""
        return None if self.size is None else size_bias(self.size, dtype)

    def select(self, x: Tensor, keep: Tensor, fuse: Tensor | None = None) -> None:
        """Follow a keep/fuse step on sizes and sources: tokens ``keep [B, K]`` stay, ``fuse [B, M]``
        become one trailing token whose size is their sum and whose source is their union."""
        size = self.sizes(x)
        sizes = [gather_tokens(size, keep)]
        sources = [gather_tokens(self.source, keep)] if self.source is not None else []
        if fuse is not None:
            sizes.append(fuse_tokens(size, fuse))
            if self.source is not None:
                sources.append(fuse_tokens(self.source, fuse, reduce="amax"))
        self.size = torch.cat(sizes, dim=1)
        if self.source is not None:
            self.source = torch.cat(sources, dim=1)

    def record(self) -> Record:
        return Record(
            input_tokens=self.input_tokens,
            tokens_per_layer=tuple(self.tokens_per_layer),
            num_prefix=self.num_prefix,
            size=None if self.size is None else self.size.detach(),
            source=None if self.source is None else self.source.detach(),
        )
