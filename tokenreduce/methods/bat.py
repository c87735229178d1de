"""``bat``: Beyond Attentive Tokens (Long, Zhao, Pi, Wang, Wang, "Beyond Attentive Tokens: Incorporating
Token Importance and Diversity for Efficient Vision Transformers", CVPR 2023, arXiv 2211.11315)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tokenreduce.core import Selection, bipartite_soft_matching, density_peaks, keep, keep_and_cluster, split_keep_drop
from tokenreduce.methods.base import LayerContext, PruneAtLayers
from tokenreduce.registry import register_method
from tokenreduce.validate import as_int, as_real


@register_method
@dataclass
class BAT(PruneAtLayers):
    """At a few blocks, split the tokens by class-token attention into attentive and inattentive ones;
    keep the attentive ones, cluster the inattentive ones into a few tokens and make room for them by
    merging pairs of similar attentive tokens.

    The paper (abstract): "According to the class token attention, we decouple the attentive and
    inattentive tokens. In addition to preserving the most discriminative local tokens, we merge similar
    inattentive tokens and match homogeneous attentive tokens to maximize the token diversity." Its
    repository (``BWLONG/BeyondAttentiveTokens``) has a README, a method figure and training logs but no
    code, and the paper's method section could not be retrieved. What the figure and its caption (as
    quoted by a review) give: "Employ our method at the 4th, 7th, and 10th layers of the DeiT-S model";
    the token decoupler sits after the attention residual, before the feed-forward network; "we cluster
    inattentive tokens and combine the tokens from the same group into a new token. Meanwhile, we match
    homogeneous attentive tokens and combine the same pair of tokens"; the clustering is "a simplified
    density peak clustering algorithm", the groups "combined via weighted" averages (the review's text
    breaks off there). In the figure five attentive tokens become two pairs and one single token, five
    inattentive ones two groups: as many outputs as attentive tokens. At a reduction block with ``N``
    tokens of which ``P`` are prefix tokens:

    1. Decouple: the ``K = ceil(keep_rate (N - P))`` non-prefix tokens the class token attends to most
       (head-averaged softmax row, beside SDPA) are attentive, the other ``M = N - P - K`` inattentive.
       ``K`` is EViT's count without its fused token (our choice): it reproduces the README's rounded
       GMACs at every keep rate (keep 0.7: 197 -> 139 -> 98 -> 69 tokens, 3.0 GMACs). The logs' exact
       counts (3.005, 2.583, 2.344, 2.083, 1.823, 1.645 GMACs at keep 0.7 ... 0.2) follow no simple count
       rule we found, so the paper's own counts remain unknown.
    2. Cluster the inattentive tokens into ``C = min(ceil(cluster_rate M), floor(K / 2))`` groups with
       DPC-kNN (TCFormer's density peaks, ``neighbours`` nearest, on the hidden states; how the paper
       "simplified" it is unknown); each group
       becomes its members' mean weighted by their class-token attention (EViT's importance weights),
       at the position of the group's centre. ``cluster_rate`` and the bound are our choices (the figure's
       2 of 5 fits them); ``floor(K / 2)`` is the most pairs a bipartite matching of ``K`` tokens merges.
    3. Match: ``C`` pairs of attentive tokens are merged by ToMe's bipartite soft matching (alternate
       A/B split over the attentive tokens in position order, cosine of the keys averaged over heads,
       size-weighted means), so that ``K`` tokens leave: ``K - C`` attentive and ``C`` clustered.
    4. Order: prefix tokens, the ``C`` clustered tokens, then ToMe's order (unmerged A, then B).

    With ``C = 0`` (``cluster_rate=0``, or ``K < 2``) the inattentive tokens are dropped (Top-K pruning).
    Defaults: ``keep_rate=0.7`` at the 4th, 7th and 10th block (scaled to the model's depth), the
    README's main setting; ``neighbours=5`` (TCFormer's DPC-kNN); no proportional attention (BAT builds
    on EViT). The README's accuracies (79.6 at keep 0.7) are for models trained with BAT; this is its
    off-the-shelf use, for which no number was published.
    """

    name = "bat"
    paper = (
        "Long et al., Beyond Attentive Tokens: Incorporating Token Importance and Diversity for "
        "Efficient Vision Transformers, CVPR 2023"
    )

    cluster_rate: float = 0.5  # clustered tokens per inattentive token (rounded up)
    neighbours: int = 5  # nearest neighbours of the DPC-kNN density

    def __post_init__(self) -> None:
        super().__post_init__()
        self.cluster_rate = as_real("cluster_rate", self.cluster_rate, 0, 1)
        self.neighbours = as_int("neighbours", self.neighbours, 1)

    def num_clusters(self, attentive: int, inattentive: int) -> int:
        """Clustered outputs (and merged attentive pairs) for ``attentive`` + ``inattentive`` tokens."""
        return min(math.ceil(self.cluster_rate * inattentive), attentive // 2)

    def select(self, x: Tensor, ctx: LayerContext) -> Selection | None:
        b, n, p = x.shape[0], x.shape[1], ctx.num_prefix
        if ctx.num_out == n:
            return None
        k = ctx.num_out - p
        scores = self.scores(ctx)
        attentive, inattentive = split_keep_drop(scores, k, p)
        kept = torch.cat([attentive[:, :p], attentive[:, p:].sort(dim=1).values], dim=1)
        c = self.num_clusters(k, inattentive.shape[1])
        if c == 0:
            return keep(kept, n)
        features = x.gather(1, inattentive[..., None].expand(-1, -1, x.shape[-1]))
        assignment, centres = density_peaks(features, c, self.neighbours)
        grouped = keep_and_cluster(kept, inattentive, assignment, centres, n, scores.gather(1, inattentive - p))
        # The clustered tokens go in front of the attentive ones: the matching leaves leading tokens alone.
        positions = torch.arange(p + k + c, device=x.device)
        order = torch.cat([positions[:p], positions[p + k :], positions[p : p + k]])
        grouped = grouped.then(keep(order.expand(b, -1), p + k + c))
        matched = bipartite_soft_matching(grouped.apply(ctx.metric().float()), c, p + c, grouped.sizes(ctx.sizes(x)))
        return grouped.then(matched)
