"""The one result every reduction produces: which input tokens feed which output tokens, and how.

A :class:`Selection` maps ``N`` tokens to ``num_out`` per batch row as a linear map in which every
input feeds at most one output: ``out[j] = sum(coeff[i] * x[i] for i with slot[i] == j)``. Pruning,
ToMe's weighted merges, EViT's fused token, pooling and clustering are all of this form, so one
object can be applied to features, followed on sizes and sources, undone for dense outputs
(:meth:`Selection.unmerge`) and used to carry positions or masks along (:meth:`Selection.take`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _rows(t: Tensor) -> Tensor:
    return torch.arange(t.shape[0], device=t.device)[:, None]


@dataclass(frozen=True)
class Selection:
    """``N -> num_out`` tokens per batch row.

    Attributes:
        slot: ``[B, N]`` long, the output each input feeds, ``-1`` for dropped inputs.
        index: ``[B, num_out]`` long, one input of each output: the token whose position, mask
            entry or cache row the output inherits (the kept token; the destination of a merge).
        coeff: ``[B, N]`` float32 weight of each input in its output, ``None`` for all ones.
        gather_only: every output is exactly one input with weight 1 (pure pruning), so applying
            is a gather.
    """

    slot: Tensor
    index: Tensor
    coeff: Tensor | None = None
    gather_only: bool = False

    @property
    def num_out(self) -> int:
        return self.index.shape[1]

    def apply(self, x: Tensor) -> Tensor:
        """``x [B, N, C] -> [B, num_out, C]``; sums accumulate in float32 for half-precision inputs."""
        if self.gather_only:
            return x[_rows(x), self.index]
        acc = torch.promote_types(x.dtype, torch.float32)
        values = x.to(acc) if self.coeff is None else x.to(acc) * self.coeff[..., None].to(acc)
        return self._scatter_sum(values).to(x.dtype)

    def _scatter_sum(self, values: Tensor) -> Tensor:
        # One flat index_add over the batch; dropped inputs land in a spare slot that is cut off.
        b, n, c = values.shape
        m = self.num_out
        slot = torch.where(self.slot >= 0, self.slot, m) + _rows(self.slot) * (m + 1)
        out = values.new_zeros(b * (m + 1), c).index_add_(0, slot.flatten(), values.reshape(b * n, c))
        return out.view(b, m + 1, c)[:, :m]

    def sizes(self, size: Tensor) -> Tensor:
        """Original tokens per output ``[B, num_out, 1]``, from those of the inputs ``size [B, N, 1]``."""
        if self.gather_only:
            return size[_rows(size), self.index]
        return self._scatter_sum(size.float())

    def owners(self, owner: Tensor) -> Tensor:
        """Follow ``owner [B, N0]`` (the input token covering each original token, ``-1`` if none) to
        the output covering it."""
        covered = owner >= 0
        moved = self.slot.gather(1, owner.clamp(min=0))
        return torch.where(covered, moved, torch.full_like(moved, -1))

    def take(self, t: Tensor, dim: int = 1) -> Tensor:
        """The entries of ``t`` aligned with the inputs along ``dim`` (positions, masks, cache rows)
        at each output's :attr:`index`; batch is dim 0, or absent when ``t`` has one row for all."""
        index = self.index
        if t.dim() == 1:
            return t[index]
        shape = [1] * t.dim()
        shape[0], shape[dim] = index.shape[0], index.shape[1]
        index = index.view(shape).expand(*[s if i == dim else t.shape[i] for i, s in enumerate(shape)])
        return t.gather(dim, index)

    def unmerge(self, y: Tensor, fill: float = 0.0) -> Tensor:
        """Back to ``[B, N, C]``: each input gets the value of the output it fed; dropped inputs ``fill``."""
        picked = y[_rows(y), self.slot.clamp(min=0)]
        return torch.where((self.slot >= 0)[..., None], picked, torch.full_like(picked, fill))


def first_inputs(slot: Tensor, num_out: int) -> Tensor:
    """``[B, num_out]``: the lowest input feeding each output of ``slot [B, N]`` (``N`` where none does)."""
    b, n = slot.shape
    target = torch.where(slot >= 0, slot, num_out)  # dropped inputs go to a spare output, cut off
    first = torch.full((b, num_out + 1), n, dtype=torch.long, device=slot.device)
    first = first.scatter_reduce(1, target, torch.arange(n, device=slot.device).expand(b, -1), reduce="amin")
    return first[:, :num_out]


def keep(index: Tensor, num_tokens: int) -> Selection:
    """Prune: keep the tokens at ``index [B, K]``, in that order, out of ``num_tokens``."""
    b, k = index.shape
    slot = torch.full((b, num_tokens), -1, dtype=torch.long, device=index.device)
    slot = slot.scatter(1, index, torch.arange(k, device=index.device).expand(b, -1))
    return Selection(slot, index, gather_only=True)


def keep_and_fuse(keep_index: Tensor, fuse_index: Tensor, weight: Tensor, num_tokens: int) -> Selection:
    """Keep ``keep_index [B, K]`` and add one last output ``sum(weight * x)`` over ``fuse_index [B, M]``
    (EViT's fused token; ``weight [B, M]`` is not normalised). The fused output inherits the position
    of the first fused token."""
    b, k = keep_index.shape
    slot = torch.full((b, num_tokens), -1, dtype=torch.long, device=keep_index.device)
    slot = slot.scatter(1, keep_index, torch.arange(k, device=keep_index.device).expand(b, -1))
    slot = slot.scatter(1, fuse_index, torch.full_like(fuse_index, k))
    coeff = torch.ones(b, num_tokens, device=keep_index.device).scatter(1, fuse_index, weight.float())
    return Selection(slot, torch.cat([keep_index, fuse_index[:, :1]], dim=1), coeff)


def keep_and_cluster(
    keep_index: Tensor, cluster_index: Tensor, assignment: Tensor, centres: Tensor, num_tokens: int
) -> Selection:
    """One row: keep ``keep_index [K]`` in order, then one output per cluster: the mean of the tokens
    ``cluster_index [M]`` assigned to it (``assignment [M]``), at the position of its centre
    (``centres [C]``, indices into ``cluster_index``), as SparseVLM's recycled tokens."""
    k = keep_index.shape[0]
    slot = torch.full((num_tokens,), -1, dtype=torch.long, device=keep_index.device)
    slot[keep_index] = torch.arange(k, device=keep_index.device)
    slot[cluster_index] = k + assignment
    num_out = k + centres.shape[0]
    coeff = weighted_mean_coeff(slot[None], torch.ones(1, num_tokens, device=keep_index.device), num_out)
    return Selection(slot[None], torch.cat([keep_index, cluster_index[centres]])[None], coeff)


def weighted_mean_coeff(slot: Tensor, weight: Tensor, num_out: int) -> Tensor:
    """Coefficients ``weight / (sum of weight over the output)`` that make each output the weighted
    mean of its inputs (``slot [B, N]``, ``weight [B, N]``; dropped inputs get 0)."""
    weight = weight.float()
    fed = slot >= 0
    target = torch.where(fed, slot, num_out)
    totals = weight.new_zeros(slot.shape[0], num_out + 1).scatter_add_(1, target, torch.where(fed, weight, 0.0))
    return torch.where(fed, weight / totals.gather(1, target).clamp(min=torch.finfo(weight.dtype).tiny), 0.0)
