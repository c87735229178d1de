"""``atc``: Agglomerative Token Clustering (Haurum et al., ECCV 2024)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from tokenreduce.core import Selection, agglomerative_clustering, cosine_distance, merge_clusters
from tokenreduce.core.agglomerative import LINKAGES
from tokenreduce.methods.base import Budget, EncoderMethod, LayerContext
from tokenreduce.methods.rschedule import RSpec, check_r, per_layer_r
from tokenreduce.registry import register_method
from tokenreduce.validate import as_bool

# The reference's --r-sched choices and the ToMe inflection each stands for.
R_SCHEDULES = {"constant": 0.0, "decrease": -1.0}
DEFAULT_KEEP_RATIO = 0.2  # as tome: r = 13 on ViT-S/B at 224 px


@register_method
@dataclass
class ATC(EncoderMethod):
    """After each block's attention, cluster the non-prefix tokens bottom-up on ``1 - cos`` of their keys
    (averaged over heads) and merge every cluster into its size-weighted mean (sizes add up).

    Off the shelf as the reference evaluates pretrained backbones (``SSLBackbone_setup``: ToMe's
    ``parse_r`` for the counts, ``sklearn`` ``AgglomerativeClustering(metric="precomputed")`` per image):

    - Counts: ``r`` (an int, a per-block list or ``(r, inflection)``) or ``keep_ratio``, as in ``tome``
      (:mod:`tokenreduce.methods.rschedule`). ``r_sched`` shapes an int ``r`` and ``keep_ratio``'s r:
      ``"constant"`` or ``"decrease"`` (``(r, -1)``), the reference's ``--r-sched``. Defaults: the README's
      off-the-shelf example, ``--linkage single --r-sched decrease``; its r is a sweep (0 to 45 on SWAG
      ViT-B/384), so the default amount is ``keep_ratio=0.2`` as for ``tome`` (``(13, -1)`` on ViT-S/B at
      224 px: 197 -> 57 tokens).
    - No 50% cap: a block entering with ``T`` tokens, ``P`` of them prefix tokens, leaves ``T - min(r, T - P)``
      clusters of its ``M = T - P`` other tokens (the reference's count, taken from the length including its
      class token, which it then puts back): a block removes ``r - P`` tokens, ``r - 1`` on a ViT with a
      class token. ``exact_r=True`` removes exactly ``r`` instead (ToMe's meaning of ``r``). ``r`` above
      ``M``, or leaving no cluster, raises.
    - ``prop_attn=True``: the reference's timm and SWAG patches add ``log(size)`` to the attention logits;
      its MAE patch does not (pass ``prop_attn=False`` for MAE backbones).
    - ``linkage``: ``single`` (closest members), ``average`` (UPGMA) or ``complete`` (farthest members);
      the DeiT fine-tuning recipe uses ``complete`` with proportional attention. The fine-tuned DeiT
      counts (``int(196 * keep ** (i + 1))`` at blocks 3, 6, 9) are not offered: they need training.

    Choices the reference leaves open or makes differently:

    - The clustering is a batched torch linkage (a fixed number of arg-min steps, vectorised over the
      batch), not sklearn on the CPU; it finds sklearn's clusters except where distances tie exactly,
      which it breaks towards the lowest token indices.
    - Every prefix token (class, distillation, register tokens) stays in front, unclustered. The
      reference protects the class token only: registers are clustered like patches, and its distillation
      token path leaves an empty cluster.
    - Output order: prefix tokens, then the clusters in the order of their first token, each inheriting
      that token's position (the reference orders by sklearn's labels).
    """

    name = "atc"
    budget = Budget("keep_ratio", 0.0, 1.0)
    paper = "Haurum et al., Agglomerative Token Clustering, ECCV 2024"

    r: RSpec | None = None
    keep_ratio: float | None = None  # at least this fraction of the mergeable tokens remains after the last block
    r_sched: str = "decrease"  # "constant" or "decrease": the shape of an int r and of keep_ratio's r
    linkage: str = "single"  # "single", "average" or "complete"
    prop_attn: bool = True  # weight attention by log(token size)
    exact_r: bool = False  # remove exactly r tokens per block instead of the reference's r - P

    def __post_init__(self) -> None:
        self.r, self.keep_ratio = check_r(self.r, self.keep_ratio, DEFAULT_KEEP_RATIO)
        if self.r_sched not in R_SCHEDULES:
            raise ValueError(f"r_sched must be one of {sorted(R_SCHEDULES)}, got {self.r_sched!r}")
        if self.linkage not in LINKAGES:
            raise ValueError(f"linkage must be one of {list(LINKAGES)}, got {self.linkage!r}")
        self.prop_attn = as_bool("prop_attn", self.prop_attn)
        self.exact_r = as_bool("exact_r", self.exact_r)

    def per_layer_r(self, mergeable: int, depth: int) -> list[int]:
        """``r`` of each of ``depth`` blocks for ``mergeable`` non-prefix input tokens."""
        return per_layer_r(self.r, self.keep_ratio, mergeable, depth, R_SCHEDULES[self.r_sched])

    def clusters(self, num_tokens: int, num_prefix: int, r: int, layer: int) -> int:
        """Clusters the ``num_tokens - num_prefix`` non-prefix tokens of a block form for its ``r``."""
        mergeable = num_tokens - num_prefix
        if r == 0:
            return mergeable
        highest = mergeable - 1 if self.exact_r else min(mergeable, mergeable - 1 + num_prefix)
        if r > highest:
            raise ValueError(
                f"r={r} at layer {layer} would leave no cluster of the {mergeable} mergeable tokens there "
                f"(allowed 0..{highest}{'' if self.exact_r else ' with the reference count, r - prefix removed'}); lower r"
            )
        removed = r if self.exact_r else max(0, r - num_prefix)
        return mergeable - removed

    def schedule(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        n, out = num_tokens, []
        for layer, r in enumerate(self.per_layer_r(num_tokens - num_prefix, depth)):
            n = num_prefix + self.clusters(n, num_prefix, r, layer)
            out.append(n)
        return out

    def select(self, x: Tensor, ctx: LayerContext) -> Selection | None:
        n, p = x.shape[1], ctx.num_prefix
        if ctx.num_out == n:
            return None
        root = agglomerative_clustering(cosine_distance(ctx.metric()[:, p:]), ctx.num_out - p, self.linkage)
        return merge_clusters(root, ctx.num_out - p, p, ctx.size)
