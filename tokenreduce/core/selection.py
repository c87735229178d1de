"""The one result every reduction produces: which input tokens feed which output tokens, and how.

A :class:`Selection` maps ``N`` tokens to ``num_out`` per batch row as a linear map. In its sparse form
every input feeds at most one output: ``out[j] = sum(coeff[i] * x[i] for i with slot[i] == j)``.
Pruning, ToMe's weighted merges, EViT's fused token, pooling and clustering are all of this form. Its
dense form (:func:`mix`) is any matrix ``out = M @ x``, where an input may feed several outputs
(a DCT along the tokens, graph propagation, soft clustering, many-to-many transforms); ``slot`` then
names each input's main output. Either form is applied to features, followed on sizes and sources,
undone for dense outputs (:meth:`Selection.unmerge`) and used to carry positions or masks along
(:meth:`Selection.take`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from tokenreduce.core.indices import span


def _rows(t: Tensor) -> Tensor:
    return span(t.shape[0], device=t.device)[:, None]


@dataclass(frozen=True)
class Selection:
    """``N -> num_out`` tokens per batch row.

    Attributes:
        slot: ``[B, N]`` long, the output each input feeds (dense form: the one it feeds most),
            ``-1`` for dropped inputs.
        index: ``[B, num_out]`` long, one input of each output: the token whose position, mask
            entry or cache row the output inherits (the kept token; the destination of a merge).
        coeff: ``[B, N]`` float32 weight of each input in its output, ``None`` for all ones.
        gather_only: every output is exactly one input, its ``index``, with weight 1 (pure pruning),
            so applying is a gather. An input whose ``slot`` names an output of which it is not the
            ``index`` is pruned with copy-back: it feeds nothing, and :meth:`unmerge` gives it that
            output (SiTo's recovery from a similar kept token).
        mean: each output is the ``coeff``-weighted mean of its inputs (``coeff`` then holds the
            unnormalised weights, e.g. sizes): the sums and their normaliser come from one scatter.
        matrix: dense form only, ``[B, num_out, N]`` float32: ``out = matrix @ x``.
        size_matrix: dense form only, ``[B, num_out, N]``: how sizes follow (``None``: each input's
            size is shared among its outputs in proportion to ``|matrix|``, so the total is kept).
        inverse: dense form only, ``[B, N, num_out]``: how :meth:`unmerge` rebuilds the inputs
            (``None``: each input takes the outputs it feeds, weighted by its share in them).
        restores: the outputs are again the ``num_out`` original tokens (a reconstruction), so
            sizes and owners start afresh.
        size_coeff: sparse form only, ``[B, N]`` float32 weight of each input's size in its output's
            size (``None``: sizes add). DiffRate discounts a merged token's size by its similarity.
    """

    slot: Tensor
    index: Tensor
    coeff: Tensor | None = None
    gather_only: bool = False
    mean: bool = False
    matrix: Tensor | None = None
    size_matrix: Tensor | None = None
    inverse: Tensor | None = None
    restores: bool = False
    size_coeff: Tensor | None = None

    @property
    def num_out(self) -> int:
        return self.index.shape[1]

    def apply(self, x: Tensor) -> Tensor:
        """``x [B, N, C] -> [B, num_out, C]``; sums accumulate in float32 for half-precision inputs."""
        if self.gather_only:
            return x[_rows(x), self.index]
        acc = torch.promote_types(x.dtype, torch.float32)
        if self.matrix is not None:
            return torch.bmm(self.matrix.to(acc), x.to(acc)).to(x.dtype)
        return self._sums(x.to(acc)).to(x.dtype)

    def _sums(self, x: Tensor) -> Tensor:
        """The ``coeff``-weighted sums of ``x`` per output (means when :attr:`mean`)."""
        weight = None if self.coeff is None else self.coeff[..., None].to(x.dtype)
        out = self._scatter_sum(x if weight is None else x * weight)
        if not self.mean:
            return out
        # the normaliser from its own one-channel scatter: cheaper than concatenating it to the tokens
        total = self._scatter_sum(torch.ones_like(x[..., :1]) if weight is None else weight)
        return out / total.clamp(min=torch.finfo(total.dtype).tiny)

    def weights(self) -> Tensor:
        """The weight of each input in its output ``[B, N]`` (float32; 0 for dropped inputs)."""
        if self.mean:
            ones = torch.ones_like(self.slot, dtype=torch.float32)
            return weighted_mean_coeff(self.slot, ones if self.coeff is None else self.coeff, self.num_out)
        fed = self.slot >= 0
        if self.gather_only:  # a copy-back input names an output it does not feed
            fed &= self.index.gather(1, self.slot.clamp(min=0)) == span(self.slot.shape[1], device=self.slot.device)
        coeff = torch.ones_like(self.slot, dtype=torch.float32) if self.coeff is None else self.coeff.float()
        return torch.where(fed, coeff, 0.0)

    def size_weights(self) -> Tensor:
        """The weight of each input's size in its output's size ``[B, N]`` (float32; ones by default)."""
        return torch.ones_like(self.slot, dtype=torch.float32) if self.size_coeff is None else self.size_coeff.float()

    def _flat_slot(self) -> Tensor:
        # Each input's output in one flat [B * (num_out + 1)] range; dropped inputs go to a spare output per
        # row. Kept on the instance (the sums, the normaliser and the sizes all scatter by it).
        flat = self.__dict__.get("_flat")
        if flat is None:
            m = self.num_out
            flat = (torch.where(self.slot >= 0, self.slot, m) + _rows(self.slot) * (m + 1)).flatten()
            object.__setattr__(self, "_flat", flat)
        return flat

    def _scatter_sum(self, values: Tensor) -> Tensor:
        # One flat index_add over the batch; the spare outputs are cut off.
        b, n, c = values.shape
        m = self.num_out
        out = values.new_zeros(b * (m + 1), c).index_add_(0, self._flat_slot(), values.reshape(b * n, c))
        return out.view(b, m + 1, c)[:, :m]

    def sizes(self, size: Tensor) -> Tensor:
        """Original tokens per output ``[B, num_out, 1]``, from those of the inputs ``size [B, N, 1]``."""
        if self.restores:
            return torch.ones(size.shape[0], self.num_out, 1, device=size.device)
        if self.gather_only:
            return size[_rows(size), self.index]
        if self.matrix is not None:
            weights = _share(self.matrix) if self.size_matrix is None else self.size_matrix.float()
            return torch.bmm(weights, size.float())
        if self.size_coeff is not None:
            return self._scatter_sum(size.float() * self.size_coeff[..., None].float())
        return self._scatter_sum(size.float())

    def owners(self, owner: Tensor) -> Tensor:
        """Follow ``owner [B, N0]`` (the input token covering each original token, ``-1`` if none) to
        the output covering it."""
        if self.restores:
            return torch.arange(self.num_out, device=owner.device).expand(owner.shape[0], -1)
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
        """Back to ``[B, N, C]``: each input gets the value of the output it fed (dense form: the
        outputs it feeds, weighted by its share in each, or :attr:`inverse`); dropped inputs ``fill``."""
        if self.matrix is not None:
            inverse = _share(self.matrix).transpose(1, 2) if self.inverse is None else self.inverse
            back = torch.bmm(inverse.to(torch.promote_types(y.dtype, torch.float32)), y.float()).to(y.dtype)
            return torch.where((self.slot >= 0)[..., None], back, torch.full_like(back, fill))
        # one flat row gather from the outputs and a spare ``fill`` row per batch row (dropped inputs'
        # place in the flat slot): cheaper than an advanced-index gather and a where over all inputs
        b, m, c = y.shape
        outputs = y.new_full((b, m + 1, c), fill)
        outputs[:, :m] = y
        return outputs.view(b * (m + 1), c).index_select(0, self._flat_slot()).view(b, -1, c)

    def row(self, b: int) -> Selection:
        """Batch row ``b`` as a selection of one row (every per-row tensor cut to ``[b : b + 1]``)."""
        cut = {f.name: v[b : b + 1] for f in fields(self) if isinstance(v := getattr(self, f.name), Tensor)}
        return replace(self, **cut)

    def dense(self) -> Tensor:
        """The map as a matrix ``[B, num_out, N]`` (float32): ``apply(x) == dense() @ x``."""
        if self.matrix is not None:
            return self.matrix.float()
        b, n = self.slot.shape
        coeff = self.weights()
        target = torch.where(self.slot >= 0, self.slot, self.num_out)
        out = coeff.new_zeros(b, self.num_out + 1, n).scatter_(1, target[:, None], coeff[:, None])
        return out[:, : self.num_out]

    def then(self, later: Selection) -> Selection:
        """This selection followed by ``later`` (which acts on this one's outputs), as one selection."""
        index = self.index.gather(1, later.index)
        if self.matrix is None and later.matrix is None and not self.restores and not later.restores:
            fed = self.slot >= 0
            slot = torch.where(fed, later.slot.gather(1, self.slot.clamp(min=0)), -1)
            gather_only = self.gather_only and later.gather_only
            coeff = size_coeff = None
            if not gather_only:
                coeff = self._compose(self.weights(), later.weights(), slot)
            if self.size_coeff is not None or later.size_coeff is not None:
                size_coeff = self._compose(self.size_weights(), later.size_weights(), slot)
            return Selection(slot, index, coeff, gather_only, size_coeff=size_coeff)
        return mix(torch.bmm(later.dense(), self.dense()), index=index, restores=later.restores)

    def _compose(self, first: Tensor, second: Tensor, slot: Tensor) -> Tensor:
        """Per-input weights ``[B, N]`` of this selection followed by a later one (``slot`` the composed
        one): ``first`` times the later weight ``second`` of the output each input feeds."""
        return torch.where(slot >= 0, first * second.gather(1, self.slot.clamp(min=0)), 0.0)


def _share(matrix: Tensor) -> Tensor:
    """``|matrix|`` with each input's column scaled to sum to 1: the share of every input in each output."""
    weight = matrix.float().abs()
    return weight / weight.sum(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


def mix(
    matrix: Tensor,
    *,
    index: Tensor | None = None,
    size_matrix: Tensor | None = None,
    inverse: Tensor | None = None,
    restores: bool = False,
) -> Selection:
    """The dense selection ``out = matrix @ x`` for ``matrix [B, num_out, N]``. Each input's main output
    (its ``slot``, which owners follow) is the one it feeds most, ``-1`` when it feeds none; each
    output inherits the position of ``index [B, num_out]`` (default: the input it takes most from).
    ``size_matrix``, ``inverse`` and ``restores`` as in :class:`Selection`."""
    weight = matrix.detach().float().abs()
    best, main = weight.max(dim=1)
    slot = torch.where(best > 0, main, -1)
    if index is None:
        index = weight.argmax(dim=2)
    return Selection(slot, index, matrix=matrix, size_matrix=size_matrix, inverse=inverse, restores=restores)


def pad_prefix(matrix: Tensor, num_prefix: int) -> Tensor:
    """``matrix [B, M, N]`` acting on the tokens after ``num_prefix`` prefix tokens, as ``[B, num_prefix + M,
    num_prefix + N]`` that passes the prefix tokens through unchanged (for :func:`mix`)."""
    if num_prefix == 0:
        return matrix
    b, m, n = matrix.shape
    eye = torch.eye(num_prefix, device=matrix.device, dtype=matrix.dtype).expand(b, -1, -1)
    top = torch.cat([eye, matrix.new_zeros(b, num_prefix, n)], dim=2)
    return torch.cat([top, torch.cat([matrix.new_zeros(b, m, num_prefix), matrix], dim=2)], dim=1)


def choose_rows(take_first: Tensor, first: Selection, second: Selection) -> Selection:
    """Per batch row, ``first`` where ``take_first [B]`` is True, else ``second`` (same ``num_out``):
    a method that picks its rule per image (PPT's prune or pool) while the count stays uniform."""
    if first.num_out != second.num_out:
        raise ValueError(f"both selections must leave the same count, got {first.num_out} and {second.num_out}")
    pick = take_first.bool()
    index = torch.where(pick[:, None], first.index, second.index)
    if first.matrix is not None or second.matrix is not None:
        matrix = torch.where(pick[:, None, None], first.dense(), second.dense())
        return mix(matrix, index=index)
    slot = torch.where(pick[:, None], first.slot, second.slot)
    if first.gather_only and second.gather_only:
        return Selection(slot, index, gather_only=True)
    size_coeff = None
    if first.size_coeff is not None or second.size_coeff is not None:
        size_coeff = torch.where(pick[:, None], first.size_weights(), second.size_weights())
    return Selection(slot, index, torch.where(pick[:, None], first.weights(), second.weights()), size_coeff=size_coeff)


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


def index_only(selection: Selection) -> Selection:
    """``selection`` (sparse form) with each output its :attr:`~Selection.index` token alone: the other
    inputs feeding it get weight 0 but keep their slot, so :meth:`Selection.unmerge` still copies the
    output back to them (pruning with copy-back: importance-based ToMe's merge without averaging)."""
    if selection.matrix is not None:
        raise ValueError("index_only needs a sparse selection (each input feeding one output), got a dense one")
    heads = torch.zeros(selection.slot.shape, device=selection.slot.device).scatter_(1, selection.index, 1.0)
    return Selection(selection.slot, selection.index, heads)


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
    keep_index: Tensor,
    cluster_index: Tensor,
    assignment: Tensor,
    centres: Tensor,
    num_tokens: int,
    weight: Tensor | None = None,
) -> Selection:
    """Keep ``keep_index [K]`` in order, then one output per cluster: the mean of the tokens
    ``cluster_index [M]`` assigned to it (``assignment [M]``), weighted by ``weight [M]`` (``None``: a
    plain mean, as SparseVLM's recycled tokens), at the position of its centre (``centres [C]``, indices
    into ``cluster_index``). One row, or a batch with a leading dimension ``B`` on every argument."""
    if keep_index.dim() == 1:
        weight = None if weight is None else weight[None]
        return keep_and_cluster(keep_index[None], cluster_index[None], assignment[None], centres[None], num_tokens, weight)
    b, k = keep_index.shape
    device = keep_index.device
    slot = torch.full((b, num_tokens), -1, dtype=torch.long, device=device)
    slot = slot.scatter(1, keep_index, torch.arange(k, device=device).expand(b, -1)).scatter(1, cluster_index, k + assignment)
    mass = torch.ones(b, num_tokens, device=device)
    if weight is not None:
        mass = mass.scatter(1, cluster_index, weight.float())
    num_out = k + centres.shape[1]
    index = torch.cat([keep_index, cluster_index.gather(1, centres)], dim=1)
    return Selection(slot, index, weighted_mean_coeff(slot, mass, num_out))


def weighted_mean_coeff(slot: Tensor, weight: Tensor, num_out: int) -> Tensor:
    """Coefficients ``weight / (sum of weight over the output)`` that make each output the weighted
    mean of its inputs (``slot [B, N]``, ``weight [B, N]``; dropped inputs get 0)."""
    weight = weight.float()
    fed = slot >= 0
    target = torch.where(fed, slot, num_out)
    totals = weight.new_zeros(slot.shape[0], num_out + 1).scatter_add_(1, target, torch.where(fed, weight, 0.0))
    return torch.where(fed, weight / totals.gather(1, target).clamp(min=torch.finfo(weight.dtype).tiny), 0.0)
