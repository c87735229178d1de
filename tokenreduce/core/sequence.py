"""Shortening a batch of token sequences where image spans lost tokens, and carrying decode steps.

A VLM's prompt holds one run of placeholder tokens per image. When an image keeps ``k`` of its ``N``
tokens, its span shrinks to ``k``; rows may shrink by different amounts, so the batch is re-padded.
Everything here is index bookkeeping on ``[B, L]`` tensors: no model code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SpanKeep:
    """What one image keeps of its span (``placeholders`` tokens from ``start`` in row ``row``):
    ``kept`` tokens, written by the caller to the first ``kept`` places of the span, and for each the
    place within the span whose position id it takes (``position [kept]``)."""

    row: int
    start: int
    placeholders: int
    kept: int
    position: Tensor


@dataclass(frozen=True)
class Compaction:
    """How a prefill of ``length`` tokens per row became ``L'`` (``embed_index.shape[1]``), and how to
    continue decoding after it.

    ``embed_index``/``position_index`` ``[B, L']`` pick, for every new slot, the old position whose
    embedding and whose position id it takes; ``mask [B, L']`` is the new 2-D attention mask (0 on
    padding); ``first [B]`` is each row's first real (unpadded) position in the old prompt; ``shift [B]``
    counts the real tokens each row lost. ``reindex`` numbers the kept tokens consecutively from the
    row's first position id instead of keeping their original ones.
    """

    length: int
    embed_index: Tensor
    position_index: Tensor
    mask: Tensor
    first: Tensor
    shift: Tensor
    reindex: bool

    def then(self, later: Compaction) -> Compaction:
        """This compaction followed by ``later`` (which acts on this one's output), as one from this
        one's input: how a second pruning stage maps back to the first stage's sequence."""
        return Compaction(
            self.length,
            self.embed_index.gather(1, later.embed_index),
            self.position_index.gather(1, later.position_index),
            later.mask,
            self.first,
            self.shift + later.shift,
            later.reindex,
        )

    def causal_mask(self, queries: int = 0) -> Tensor:
        """A boolean ``[B, 1, q, L' + q]`` attention mask for a compacted prefill (``queries=0``: ``q = L'``,
        causal) or for ``queries`` new tokens after it, hiding the padding compaction put in; a padding
        query sees itself, so no row is empty."""
        b, length = self.mask.shape
        visible = self.mask.bool()
        if queries == 0:
            grid = torch.ones(length, length, dtype=torch.bool, device=visible.device).tril()
            eye = torch.eye(length, dtype=torch.bool, device=visible.device)
            return (grid & visible[:, None, :] | eye)[:, None]
        new = torch.ones(queries, queries, dtype=torch.bool, device=visible.device).tril()
        return torch.cat([visible[:, None, :].expand(-1, queries, -1), new.expand(b, -1, -1)], dim=2)[:, None]

    def embeds(self, x: Tensor) -> Tensor:
        """``[B, L, C] -> [B, L', C]``."""
        return x.gather(1, self.embed_index[..., None].expand(-1, -1, x.shape[-1]))

    def positions(self, position_ids: Tensor) -> Tensor:
        """Position ids for the compacted prefill from those of the full one: ``[B, L] -> [B, L']``, or
        ``[R, B, L] -> [R, B, L']`` for multi-row ids (M-RoPE, kept positions only). Padding keeps its
        own ids, so a prompt that lost nothing is unchanged."""
        kept = position_ids.gather(-1, self.position_index.expand(*position_ids.shape[:-2], -1, -1))
        if not self.reindex:
            return kept
        start = position_ids.gather(-1, self.first[:, None])
        return torch.where(self.mask.bool(), start + (self.mask.cumsum(-1) - 1).clamp(min=0), kept)

    def decode_mask(self, mask: Tensor) -> Tensor:
        """A decode step's 2-D mask, grown by ``generate`` from the full prefill, for the compacted cache."""
        return torch.cat([self.mask.to(mask.dtype), mask[:, self.length :]], dim=1)

    def square_mask(self, mask: Tensor) -> Tensor:
        """A prefill's 4-D mask ``[B, H, L, L]`` (bool, or additive float) for the compacted prompt."""
        index = self.embed_index[:, None]
        rows = mask.gather(2, index[..., None].expand(-1, mask.shape[1], -1, mask.shape[3]))
        out = rows.gather(3, index[:, :, None].expand(-1, mask.shape[1], rows.shape[2], -1))
        return hide_columns(out, self.mask.bool())

    def decode_columns(self, mask: Tensor) -> Tensor:
        """A decode step's 4-D mask ``[B, H, q, L + t]`` over the full prefill, for the compacted cache."""
        grown = mask.shape[-1] - self.length
        steps = torch.arange(self.length, self.length + grown, device=mask.device).expand(mask.shape[0], -1)
        columns = torch.cat([self.embed_index, steps], dim=1)[:, None, None]
        out = mask.gather(3, columns.expand(-1, mask.shape[1], mask.shape[2], -1))
        return hide_columns(out, torch.cat([self.mask.bool(), torch.ones_like(steps, dtype=torch.bool)], dim=1))

    def decode_positions(self, position_ids: Tensor) -> Tensor:
        """A decode step's position ids (counted from the full prefill): reindexed ones move back by
        the tokens each row lost; kept ones stay."""
        return position_ids - self.shift.view(*([1] * (position_ids.dim() - 2)), -1, 1) if self.reindex else position_ids


def hide_columns(mask: Tensor, visible: Tensor) -> Tensor:
    """``mask [B, H, q, K]`` (bool, or additive float) with the key columns where ``visible [B, K]`` is
    False masked out (bool: False; float: the dtype's minimum)."""
    visible = visible[:, None, None, :]
    if mask.dtype == torch.bool:
        return mask & visible
    return mask.masked_fill(~visible, torch.finfo(mask.dtype).min)


def hide_columns_keeping_rows(mask: Tensor, hidden: Tensor) -> Tensor:
    """``mask [B, H, q, K]`` (bool, or additive float) with the key columns where ``hidden [B, P]`` is
    True (``P <= K``: the first ``P`` columns) masked out, except on a query row this would leave
    seeing nothing: there the row stays as it was (the queries are the last ``q`` columns, so such a
    row is a hidden token's own, or one the mask already left empty)."""
    visible = torch.cat([~hidden, hidden.new_ones(hidden.shape[0], mask.shape[-1] - hidden.shape[1])], dim=1)
    out = hide_columns(mask, visible)
    seen = out if out.dtype == torch.bool else out > torch.finfo(out.dtype).min
    return torch.where(seen.any(dim=-1, keepdim=True), out, mask)


def image_spans(placeholder: Tensor, tokens: int | None = None) -> list[tuple[int, int, int]]:
    """``(row, start, length)`` of every image span of ``placeholder [B, L]`` in row-major order: each
    run of consecutive image tokens, cut into pieces of ``tokens`` when every image has that many."""
    spans = []
    for row in range(placeholder.shape[0]):
        where = placeholder[row].nonzero().flatten().tolist()
        start = prev = None
        for i in [*where, None]:
            if start is not None and (i is None or i != prev + 1):
                run = prev - start + 1
                if tokens is not None and run % tokens:
                    raise ValueError(f"an image token run of {run} at row {row}, position {start} is not a multiple of {tokens}")
                step = tokens or run
                spans += [(row, s, step) for s in range(start, start + run, step)]
                start = None
            if i is not None and start is None:
                start = i
            prev = i
    return spans


def compact(attention_mask: Tensor, spans: Sequence[SpanKeep], reindex: bool) -> Compaction:
    """The :class:`Compaction` of prompts with 2-D mask ``attention_mask [B, L]`` whose image spans keep
    what ``spans`` say.

    Every row keeps its real tokens in order (each image span cut to its kept tokens), then is padded
    to the longest row on the side the batch is padded on (left when only left padding is seen, else
    right), reusing the row's own padding first: a prompt that lost nothing comes out unchanged.
    """
    b, length = attention_mask.shape
    device = attention_mask.device
    mask = attention_mask.long()
    real = mask.bool()
    by_row: dict[int, list[SpanKeep]] = {}
    for span in spans:
        by_row.setdefault(span.row, []).append(span)
    rows = []
    for row in range(b):
        embed, position, cursor = [], [], 0
        for span in sorted(by_row.get(row, []), key=lambda sp: sp.start):
            between = torch.arange(cursor, span.start, device=device)
            before = between[real[row, between]]
            embed += [before, span.start + torch.arange(span.kept, device=device)]
            position += [before, span.start + span.position.to(device)]
            cursor = span.start + span.placeholders
        tail = torch.arange(cursor, length, device=device)
        tail = tail[real[row, tail]]
        rows.append((torch.cat([*embed, tail]), torch.cat([*position, tail]), (~real[row]).nonzero().flatten()))
    new_length = max(e.shape[0] for e, _, _ in rows)
    left = bool((~real[:, 0]).any()) and bool(real[:, -1].all())
    embed_index = torch.zeros(b, new_length, dtype=torch.long, device=device)
    position_index = torch.zeros_like(embed_index)
    new_mask = torch.zeros_like(embed_index)
    for row, (e, p, pads) in enumerate(rows):
        need = new_length - e.shape[0]
        fill = torch.cat([pads[:need], pads.new_zeros(max(0, need - pads.shape[0]))])
        embed_index[row] = torch.cat([fill, e] if left else [e, fill])
        position_index[row] = torch.cat([fill, p] if left else [p, fill])
        new_mask[row, slice(need, new_length) if left else slice(0, e.shape[0])] = 1
    return Compaction(length, embed_index, position_index, new_mask, mask.argmax(dim=1), mask.sum(1) - new_mask.sum(1), reindex)


def expansion_index(compaction: Compaction, spans: Sequence[tuple[int, int, int]], owners: Sequence[Tensor]) -> Tensor:
    """``[B, L]``: for every token of the prompt before ``compaction`` (``L = compaction.length``), the
    slot of the compacted prompt that stands for it, or -1 on dropped tokens. Text tokens map to their
    own slot; the placeholders of image span ``(row, start, n)`` map through ``owners[i] [n]`` (the
    kept token covering each, -1 where none does) to that kept token's slot, kept tokens being written
    to the front of their span (as :func:`compact` expects); padding maps to the padding slot that
    reuses it, where one does (else -1), so that a prompt that lost nothing maps onto itself."""
    b, length = compaction.mask.shape[0], compaction.length
    device = compaction.mask.device
    source = torch.arange(length, device=device).expand(b, -1).clone()
    for (row, start, n), owner in zip(spans, owners):
        owner = owner.to(device)
        source[row, start : start + n] = torch.where(owner >= 0, start + owner, -1)
    slot = torch.full((b, length + 1), -1, dtype=torch.long, device=device)
    new = torch.arange(compaction.mask.shape[1], device=device).expand(b, -1)
    real = compaction.mask.bool()
    # padding slots first, then real ones over them (extra padding slots reuse position 0); the
    # spare last column takes what each pass leaves out
    slot.scatter_(1, torch.where(real, length, compaction.embed_index), new)
    slot.scatter_(1, torch.where(real, compaction.embed_index, length), new)
    found = slot[:, :length].gather(1, source.clamp(min=0))
    return torch.where(source >= 0, found, -1)


def expand_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x [B, L', C]`` laid out over ``index [B, L]`` (a slot of ``x`` per place, -1: any row, to be
    masked): ``[B, L, C]``."""
    return x.gather(1, index.clamp(min=0)[..., None].expand(-1, -1, x.shape[-1]))


def merge_mean(x: Tensor, index: Tensor, length: int) -> Tensor:
    """The inverse of :func:`expand_tokens` for dense outputs: ``x [B, L, C]`` averaged over the places
    of each slot of ``index [B, L]`` into ``[B, length, C]`` (places at -1 are left out, even when not
    finite; a slot no place maps to gets zeros)."""
    target = torch.where(index >= 0, index, length)[..., None].expand_as(x)
    out = x.new_zeros(x.shape[0], length + 1, x.shape[-1])
    return out.scatter_reduce(1, target, x, "mean", include_self=False)[:, :length]
