"""``expedite``: Hourglass token clustering and reconstruction (Liang et al., "Expediting Large-Scale Vision
Transformer for Dense Prediction without Fine-tuning", NeurIPS 2022)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from tokenreduce.core import Selection, knn_reconstruction_weights, local_soft_kmeans, mix, pad_prefix
from tokenreduce.methods.base import Budget, EncoderMethod, Hook, LayerContext
from tokenreduce.registry import register_method
from tokenreduce.validate import as_bool, as_int, as_int_tuple, as_real

# The reference's Segmenter ViT-L/16 setting on ADE20K at 640 px (configs/segmenter_hourglass_vit):
# clustering after block 9 of 24 (alpha = 10 blocks at full resolution), 28 x 28 clusters of the 40 x 40 grid.
ALPHA_RATIO = 10 / 24
CLUSTER_RATIO = 28 / 40
NORMS = ("l2", "sum")


def _round(value: float) -> int:
    return math.floor(value + 0.5)


@register_method
@dataclass
class Expedite(EncoderMethod):
    """Cluster the patch tokens once, after block ``location``, into an ``h x w`` grid of centroids by local
    soft k-means; run the remaining blocks on the centroids; rebuild every patch token after the last block
    from the centroids by kNN reconstruction (the hourglass).

    Clustering (the reference's ``TokenClusteringBlock``) at the end of block ``location``: the prefix tokens
    (CLS, registers) are set aside and the patch tokens laid on their grid; the centroids start as the
    adaptive average pool of the grid to ``h x w``; each of ``n_iters`` rounds computes, for every token,
    ``softmax(-tau * |x - c|^2)`` over the centroids within ``window_size // 2`` cells of the token's initial
    cell and moves each centroid to the affinity-weighted mean. The output is the prefix tokens then the
    ``h * w`` centroids (a dense :func:`~tokenreduce.core.mix`; sizes are each token's affinity share, no
    proportional attention, as in the reference).

    Reconstruction (``TokenReconstructionBlock``): ``W = exp(-recon_tau * |x - c|^2)`` between the patch
    tokens and the centroids *at clustering time*, kept at each token's ``recon_k`` largest entries and
    L2-normalised across the centroids (the reference's ``F.normalize``; ``recon_norm="sum"`` makes the
    weights sum to 1 instead). The weights are kept in the forward's carried value and, with
    ``reconstruct=True``, applied to the centroids at the end of the last block (after the MLP, before the
    model's final norm and head), so the encoder again leaves every original token. The same weights are the
    clustering step's ``inverse``, so :meth:`Record.restore` and timm's ``forward_intermediates`` (NCHW) use
    Expedite's own reconstruction at every block in between.

    Defaults, from the reference's Segmenter ViT-L/16 ADE20K config (``location=9`` of 24 blocks,
    ``num_spixels=784`` of a 40 x 40 grid, ``n_iters=5``, ``window_size=5``, ``temperture=0.02``;
    reconstruction ``k=20``, ``temperture=0.02``), scaled to any depth and grid: ``alpha_ratio=10/24`` of the
    blocks run at full resolution (``location = round(alpha_ratio * depth) - 1``: block 4 of DeiT-S's 12,
    block 9 of ViT-L's 24) and the cluster grid's side is ``cluster_ratio=0.7`` of the patch grid's
    (``round``, half up: 10 x 10 of DeiT-S's 14 x 14, 26 x 26 of DINOv2's 37 x 37). ``location`` and
    ``clusters`` (``h * w`` as a square number, or ``(h, w)``) set them directly. At DeiT-S (224 px) the
    default runs blocks 0-4 on 197 tokens and blocks 5-11 on 101: 3.26 of 4.60 GMACs (71%, analytic model
    with stem and head), plus about 0.1 GMACs for the clustering and reconstruction themselves (14
    products of ``K x P x C = 100 x 196 x 384``: two per soft k-means round, the final centroids, the
    reconstruction distances, the selection's mix and the rebuild after the last block).

    Choices the reference leaves open or this implementation makes:

    - The patch grid is the captured input image's (so non-square inputs work with ``clusters=(h, w)``);
      without one (tokens fed past the patch embedding) it is square. The default cluster grid is square,
      computed from the token count (the schedule knows nothing else): pass ``clusters=(h, w)`` for a
      non-square patch grid whose token count is not a square.
    - Windows are in cluster-grid cells around the token's initial cell, the label of nearest-neighbour
      upsampling of the cell grid (the reference's ``F.interpolate``); centroids outside get zero affinity
      (the reference adds 1e16 to their distances: the same after the softmax in float32).
    - Reconstruction before the head, not on the decoder's class maps (Segmenter) nor disabled
      (the SWAG classification repo has none): a library encoder has no decoder to hand it to. With
      ``reconstruct=False`` the encoder leaves the prefix tokens and centroids (the SWAG setting, which also
      uses ``temperature=1``; its README's alpha is its ``clustering_location``, this class's ``location``).
    - The weights are computed from their logits, so a token far from every centroid keeps non-zero weights
      where the reference's ``exp`` underflows (squared distances above about 5000 at ``tau=0.02``) and
      rebuilds it as zeros.
    - Ties with the ``recon_k``-th weight are kept too (the reference's ``>=`` mask); ``recon_k=None`` keeps
      every centroid (the reference's ``k < 0``).
    """

    name = "expedite"
    paper = "Liang et al., Expediting Large-Scale Vision Transformer for Dense Prediction without Fine-tuning, NeurIPS 2022"
    hook = Hook.END
    needs_image = True  # for the patch grid of non-square inputs
    budget = Budget("cluster_ratio", 0.0, 1.0)

    location: int | None = None  # block after which to cluster (0-based); default round(alpha_ratio * depth) - 1
    alpha_ratio: float | None = None  # fraction of the blocks run at full resolution, default 10/24
    clusters: int | tuple[int, int] | None = None  # h * w (a square number) or (h, w); default from cluster_ratio
    cluster_ratio: float | None = None  # side of the cluster grid over the patch grid's, default 0.7
    n_iters: int = 5  # soft k-means rounds
    window_size: int = 5  # odd: centroids within window_size // 2 cells of a token's initial cell
    tau: float = 0.02  # clustering temperature (logits -tau * squared distance)
    reconstruct: bool = True  # rebuild every token after the last block
    recon_k: int | None = 20  # centroids each token is rebuilt from (None: all)
    recon_tau: float = 0.02  # reconstruction temperature
    recon_norm: str = "l2"  # "l2" (the reference's F.normalize) or "sum"

    def __post_init__(self) -> None:
        if self.location is not None and self.alpha_ratio is not None:
            raise ValueError(f"pass location or alpha_ratio, not both (got {self.location!r} and {self.alpha_ratio!r})")
        if self.location is not None:
            self.location = as_int("location", self.location, 0)
        else:
            ratio = ALPHA_RATIO if self.alpha_ratio is None else self.alpha_ratio
            self.alpha_ratio = as_real("alpha_ratio", ratio, 0, 1, low_open=True, high_open=True)
        if self.clusters is not None and self.cluster_ratio is not None:
            raise ValueError(f"pass clusters or cluster_ratio, not both (got {self.clusters!r} and {self.cluster_ratio!r})")
        if self.clusters is not None:
            if isinstance(self.clusters, (tuple, list)) or getattr(self.clusters, "ndim", 0) == 1:
                cells = as_int_tuple("clusters", self.clusters, 1)
                if len(cells) != 2:
                    raise ValueError(f"clusters as a sequence must be (h, w) with h, w >= 1, got {self.clusters!r}")
                self.clusters = cells
            else:
                count = as_int("clusters", self.clusters, 1)
                side = math.isqrt(count)
                if side * side != count:
                    raise ValueError(f"clusters as an integer must be a square number (h * h), got {count}; or pass (h, w)")
                self.clusters = count
        else:
            ratio = CLUSTER_RATIO if self.cluster_ratio is None else self.cluster_ratio
            self.cluster_ratio = as_real("cluster_ratio", ratio, 0, 1, low_open=True)
        self.n_iters = as_int("n_iters", self.n_iters, 0)
        self.window_size = as_int("window_size", self.window_size, 1)
        if self.window_size % 2 == 0:
            raise ValueError(f"window_size must be an odd integer >= 1, got {self.window_size}")
        self.tau = as_real("tau", self.tau, 0, low_open=True)
        self.reconstruct = as_bool("reconstruct", self.reconstruct)
        if self.recon_k is not None:
            self.recon_k = as_int("recon_k", self.recon_k, 1)
        self.recon_tau = as_real("recon_tau", self.recon_tau, 0, low_open=True)
        if self.recon_norm not in NORMS:
            raise ValueError(f"recon_norm must be one of {NORMS}, got {self.recon_norm!r}")

    def clustering_location(self, depth: int) -> int:
        """The block (0-based) at whose end the tokens are clustered, for a ``depth``-block encoder."""
        last = depth - 2 if self.reconstruct else depth - 1
        if self.location is None:
            location = max(1, _round(self.alpha_ratio * depth)) - 1
            if location > last:
                raise ValueError(
                    f"alpha_ratio={self.alpha_ratio} clusters after block {location} of {depth}; with "
                    f"reconstruct={self.reconstruct} the last block it may cluster after is {last}: lower alpha_ratio"
                )
            return location
        if self.location > last:
            raise ValueError(
                f"location must be a block index in [0, {last}] for this {depth}-block model with reconstruct={self.reconstruct} "
                f"(reconstruction runs after the last block), got {self.location}"
            )
        return self.location

    def cluster_grid(self, num_patches: int) -> tuple[int, int]:
        """``(h, w)`` of the centroids for ``num_patches`` patch tokens."""
        if isinstance(self.clusters, tuple):
            cells = self.clusters
        elif self.clusters is not None:
            side = math.isqrt(self.clusters)
            cells = (side, side)
        else:
            side = math.isqrt(num_patches)
            if side * side != num_patches:
                raise ValueError(
                    f"the {num_patches} patch tokens are not a square grid, so cluster_ratio has no square cluster grid; "
                    "pass clusters=(h, w)"
                )
            cells = (max(1, _round(self.cluster_ratio * side)),) * 2
        if cells[0] * cells[1] > num_patches:
            raise ValueError(f"clusters={cells[0]}x{cells[1]} exceeds the {num_patches} patch tokens; at most {num_patches}")
        if self.recon_k is not None and self.recon_k > cells[0] * cells[1]:
            raise ValueError(
                f"recon_k must be in [1, {cells[0] * cells[1]}] (the {cells[0]}x{cells[1]} clusters), got {self.recon_k}"
            )
        return cells

    def schedule(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        location = self.clustering_location(depth)
        h, w = self.cluster_grid(num_tokens - num_prefix)
        out = [num_tokens] * location + [num_prefix + h * w] * (depth - location)
        if self.reconstruct:
            out[-1] = num_tokens
        return out

    def select(self, x: Tensor, ctx: LayerContext) -> Selection | None:
        depth = ctx.depth
        if ctx.layer == self.clustering_location(depth):
            return self._cluster(x, ctx)
        if ctx.layer == depth - 1 and self.reconstruct:
            if ctx.carry is None:
                raise RuntimeError("expedite reached the last block without the reconstruction weights of its clustering")
            return mix(ctx.carry, restores=True)
        return None

    def _cluster(self, x: Tensor, ctx: LayerContext) -> Selection:
        p = ctx.num_prefix
        patches = x[:, p:]
        num_patches = patches.shape[1]
        grid = ctx.grid
        if grid is None:
            side = math.isqrt(num_patches)
            if side * side != num_patches:
                raise ValueError(f"the {num_patches} patch tokens are not a square grid and no input image gives their layout")
            grid = (side, side)
        elif grid[0] * grid[1] != num_patches:
            raise ValueError(f"the {num_patches} patch tokens do not fill the {grid[0]}x{grid[1]} grid of the input image")
        cells = self.cluster_grid(num_patches)
        matrix = local_soft_kmeans(patches, grid, cells, self.n_iters, self.window_size, self.tau)
        weights = knn_reconstruction_weights(patches, matrix @ patches.float(), self.recon_k, self.recon_tau, self.recon_norm)
        inverse = pad_prefix(weights, p)
        ctx.carry = inverse  # [B, N, p + K]: applied after the last block when reconstruct
        return mix(pad_prefix(matrix, p), inverse=inverse)
