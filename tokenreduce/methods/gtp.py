"""``gtp``: Graph-based Token Propagation (Xu et al., "GTP-ViT: Efficient Vision Transformers via
Graph-based Token Propagation", WACV 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tokenreduce.core import Selection, graph_propagation, grid_adjacency, knn_adjacency, normalized_adjacency, zero_smallest
from tokenreduce.methods.base import Budget, EncoderMethod, LayerContext
from tokenreduce.registry import register_method
from tokenreduce.validate import as_bool, as_int, as_int_tuple, as_real, as_sequence

GRAPHS = ("mixed", "spatial", "semantic")

# P = 8 on the 196 patches of a 12-block DeiT-S/B (the README's P = 8 setting) leaves 100 of them:
# keep_ratio 0.5 gives P = int(196 * 0.5 / 12) = 8 there, and a comparable P on other sizes and depths.
DEFAULT_KEEP_RATIO = 0.5


@register_method
@dataclass
class GTP(EncoderMethod):
    """In every block, after attention, drop the ``P`` least important patch tokens and propagate each
    into its neighbours on a token graph: ``x_kept += alpha * G[kept, prop] @ x_prop``.

    Algorithm (reference: ``Ackesnal/GTP-ViT`` ``models_v3.py`` at 97a1178, flags of ``main.py``):

    1. **Graph**, built once per forward from the tokens entering block 0 (after the position embedding):
       ``graph="spatial"`` the 8-neighbour patch grid; ``"semantic"`` per token its ``num_neighbours``
       most cosine-similar tokens (a row keeps every similarity at least its ``num_neighbours + 1``-th
       largest, itself counted, then drops itself; not symmetric); ``"mixed"`` (default) their logical
       OR. Normalised once, ``D^-1/2 G D^-1/2`` with ``D`` the row sums; later blocks only take the rows
       and columns of the tokens still there, in their new order, and never renormalise.
    2. **Attention sparsity** ``sparsity`` (the paper's theta): with ``sparsity < 1`` every block's
       softmax map is edited: per (image, head) the entries below the ``k``-th smallest,
       ``k = int(N^2 (1 - sparsity))``, become 0, without renormalising. This acts in every block, also
       where nothing is dropped, so ``num_prop=0`` with ``sparsity < 1`` is not the unpatched model;
       ``num_prop=0, sparsity=1`` is.
    3. **Selection** (the reference's ``MixedAttnMax``, the README's best): ``rank_i = max_h A[h, i, i] *
       max_h sum_q A[h, q, i]`` over the non-prefix tokens, from the (sparsified) map the block used;
       the ``P`` lowest are propagated, the kept tokens are reordered by descending rank (the reference's
       ``argsort(descending=True)``; ties keep position order here).
    4. **Propagation** (``GraphProp``): the dense selection above; with ``token_scale`` the token scales
       (start 1) follow the same matrix, ``scale_kept += alpha * G[kept, prop] @ scale_prop``, and
       attention adds ``log(scale)`` to its logits.

    Defaults: the README's best DeiT-B setting for P = 8 (``MixedAttnMax`` + ``Mixed`` graph +
    ``GraphProp`` + token scale, theta 0.6, alpha 0.1), ``num_neighbours=8`` (``main.py``'s default; the
    README does not say which value its table used). No DeiT-S setting is published; the abstract's DeiT-S
    point ("up to 26% less complexity at -0.3%") is about P = 8 by the MAC count (3.42 GMACs, 197 - 12P =
    101 tokens left). ``P`` is given as ``num_prop`` (an int for every block, or one per block), or as
    ``keep_ratio``, the same ``P = int(M * (1 - keep_ratio) / depth)`` in every block for ``M`` patch
    tokens; neither gives ``keep_ratio=0.5``: P = 8 on DeiT-S/B at 224 px, P = 4 on 24-block ViT-L, P = 57
    on DINOv2 at 518 px. Other README rows (DeiT-B): P=1 theta 0.8 alpha 0.1; P=2 0.7/0.1; P=4 1.0/0.4;
    P=10 0.5/0.2; P=12 0.8/0.3; P=14 0.8/0.3.

    Choices the reference leaves open or gets wrong, and how they are settled here:

    - ``main.py`` turns everything off by default and ``hyperparameter_search.py`` passes
      ``--token_scale True`` to a ``store_true`` flag, which argparse rejects: the README's "with token
      scale" is read as the flag set, ``token_scale=True``.
    - The flag semantics carried over: token scales start at 1 for every token (prefix tokens included, and
      theirs never change); they enter attention as ``+log(scale)`` in every block and follow every
      propagation. Here they are the tokens' ``size``: :func:`tokenreduce.record` reports them, and a
      size-weighted average pool (timm ``global_pool="avg"``) weights by them, where the reference's GAP
      head takes a plain mean. They are not token counts (they grow by ``alpha`` times graph weights).
    - ``P = 0`` in the reference keeps no token (``index[:, :-0]`` is empty); here it propagates none.
    - Ranks: the reference's ``argsort`` is unstable; ties (several zeroed diagonals give rank 0) are
      broken by position here. The rank reads the sparsified map, as the reference's in-place edit does.
    - ``k = 0`` (``sparsity`` close to 1 on few tokens) makes the reference's ``kthvalue`` fail; here it
      zeroes nothing.
    - Without a class token the reference's semantic graph keeps ``num_neighbours + 1`` neighbours (its
      ``kthvalue`` index counts the class token it left out); here every layout keeps ``num_neighbours``.
    - Prefix tokens (class, distillation, registers; the reference knows only a class token) are outside
      the graph, never ranked or propagated, and stay in front; they still give and take attention.
    - The spatial graph needs the patch grid: square grids are inferred; pass ``grid=(rows, cols)`` for
      another (row-major patches), else a non-square patch count raises. ``graph="semantic"`` needs none.
    - A token without graph neighbours (degree 0) keeps zero rows and columns, where the reference divides
      by zero; a propagated token with no kept neighbour is lost.
    - Dense outputs (:meth:`Record.restore`): the selection has no inverse of its own; the default share
      rule rebuilds each propagated token as the mean of the kept tokens it was added to, weighted by its
      graph edges to them (a neighbour average), and each kept token from itself.
    """

    name = "gtp"
    paper = "Xu et al., GTP-ViT: Efficient Vision Transformers via Graph-based Token Propagation, WACV 2024"
    budget = Budget("keep_ratio", 0.0, 1.0)

    num_prop: int | list[int] | None = None  # P: tokens propagated in every block (or one per block)
    keep_ratio: float | None = None  # or: the same P in every block, leaving at least this fraction of patches
    sparsity: float = 0.6  # theta: fraction of each attention map kept (1: attention untouched, SDPA kept)
    alpha: float = 0.1  # weight of the propagated tokens
    num_neighbours: int = 8  # semantic-graph neighbours per token
    token_scale: bool = True  # token scales as log(scale) on the attention logits
    graph: str = "mixed"  # "mixed" (spatial OR semantic), "spatial" or "semantic"
    grid: tuple[int, int] | None = None  # (rows, cols) of the patch grid; None: square

    def __post_init__(self) -> None:
        if self.num_prop is not None and self.keep_ratio is not None:
            raise ValueError(f"pass num_prop or keep_ratio, not both (got {self.num_prop!r} and {self.keep_ratio!r})")
        if self.num_prop is None:
            ratio = DEFAULT_KEEP_RATIO if self.keep_ratio is None else self.keep_ratio
            self.keep_ratio = as_real("keep_ratio", ratio, 0, 1, low_open=True)
        elif isinstance(self.num_prop, (list, tuple, range)) or getattr(self.num_prop, "ndim", 0) == 1:
            items = as_sequence("num_prop", self.num_prop, "integers >= 0")
            self.num_prop = [as_int(f"num_prop[{i}]", v, 0) for i, v in enumerate(items)]
        else:
            self.num_prop = as_int("num_prop", self.num_prop, 0)
        self.sparsity = as_real("sparsity", self.sparsity, 0, 1, low_open=True)
        self.alpha = as_real("alpha", self.alpha, 0)
        self.num_neighbours = as_int("num_neighbours", self.num_neighbours, 0)
        self.token_scale = as_bool("token_scale", self.token_scale)
        if self.graph not in GRAPHS:
            raise ValueError(f"graph must be one of {GRAPHS}, got {self.graph!r}")
        if self.grid is not None:
            grid = as_int_tuple("grid", self.grid, 1)
            if len(grid) != 2:
                raise ValueError(f"grid must be (rows, cols), got {self.grid!r}")
            self.grid = (grid[0], grid[1])

    @property
    def edits_attention(self) -> bool:  # type: ignore[override]
        """Attention is edited (and so computed eagerly) only when it is sparsified."""
        return self.sparsity < 1

    @property
    def prop_attn(self) -> bool:  # type: ignore[override]
        return self.token_scale

    def per_block_prop(self, patches: int, depth: int) -> list[int]:
        """``P`` in each of ``depth`` blocks for ``patches`` non-prefix input tokens."""
        if self.keep_ratio is not None:
            return [int(patches * (1 - self.keep_ratio) / depth)] * depth
        if isinstance(self.num_prop, list):
            if len(self.num_prop) != depth:
                raise ValueError(f"num_prop as a list must have one entry per block ({depth}), got {len(self.num_prop)}")
            return list(self.num_prop)
        return [self.num_prop] * depth

    def patch_grid(self, patches: int) -> tuple[int, int]:
        """``(rows, cols)`` of ``patches`` row-major patch tokens: ``grid``, or the square they fill."""
        if self.grid is not None:
            if self.grid[0] * self.grid[1] != patches:
                raise ValueError(f"grid={self.grid} does not hold the {patches} patch tokens of this input")
            return self.grid
        side = math.isqrt(patches)
        if side * side != patches:
            raise ValueError(f"the {patches} patch tokens are not a square grid; pass grid=(rows, cols) or graph='semantic'")
        return side, side

    def schedule(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        patches = num_tokens - num_prefix
        props = self.per_block_prop(patches, depth)
        if sum(props) > 0:
            if self.graph != "semantic":
                self.patch_grid(patches)
            if self.graph != "spatial" and self.num_neighbours >= patches:
                raise ValueError(
                    f"num_neighbours must be in [0, {patches - 1}] for {patches} patch tokens, got {self.num_neighbours}"
                )
            if sum(props) >= patches:
                raise ValueError(
                    f"num_prop={props} propagates {sum(props)} tokens in all; at most {patches - 1} of the {patches} "
                    "patch tokens may go"
                )
        out, n = [], num_tokens
        for p in props:
            n -= p
            out.append(n)
        return out

    def _graph(self, patches: Tensor) -> Tensor:
        """The normalised graph ``[B, M, M]`` among the patch tokens ``[B, M, C]`` entering block 0."""
        b, m = patches.shape[:2]
        adjacency = None
        if self.graph != "semantic":
            adjacency = grid_adjacency(*self.patch_grid(m), device=patches.device).expand(b, -1, -1)
        if self.graph != "spatial":
            semantic = knn_adjacency(patches, self.num_neighbours)
            adjacency = semantic if adjacency is None else torch.maximum(adjacency, semantic)
        return normalized_adjacency(adjacency)

    def attend(self, ctx: LayerContext) -> Tensor:
        probs = ctx.attention()
        n = probs.shape[-1]
        probs = zero_smallest(probs, int(n * n * (1 - self.sparsity)))
        graph = None if ctx.carry is None else ctx.carry[0]
        ctx.carry = (graph, probs)  # the map this block used, for its selection
        return probs

    def select(self, x: Tensor, ctx: LayerContext) -> Selection | None:
        graph, probs = (None, None) if ctx.carry is None else ctx.carry
        p = ctx.num_prefix
        if ctx.layer == 0 and self._propagates():
            graph = self._graph(ctx.block_input[:, p:])
        ctx.carry = (graph, None)
        num_prop = x.shape[1] - ctx.num_out
        if num_prop == 0:
            return None
        probs = ctx.attention() if probs is None else probs
        rank = probs.diagonal(dim1=-2, dim2=-1)[:, :, p:].amax(dim=1) * probs[:, :, :, p:].sum(dim=-2).amax(dim=1)
        selection, graph = graph_propagation(rank, graph, num_prop, self.alpha, p)
        ctx.carry = (graph, None)
        return selection

    def _propagates(self) -> bool:
        if self.keep_ratio is not None:
            return self.keep_ratio < 1
        return any(self.num_prop) if isinstance(self.num_prop, list) else self.num_prop > 0
