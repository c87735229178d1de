"""Pure tensor operations for token reduction: no model code, no model-library imports."""

from tokenreduce.core.attention import (
    attention_probs,
    cls_attention,
    received_attention,
    row_attention,
    rows_attention,
    size_bias,
)
from tokenreduce.core.clustering import (
    cluster_argmin,
    cluster_selection,
    density_peaks,
    farthest_first,
    kmedoids,
    medoid_costs,
    nearest_centre,
    nearest_target_merge,
    pairwise_distances,
    strided_targets,
    top_indices,
    weighted_kmeans,
)
from tokenreduce.core.diversity import cosine_distance, max_min_subset
from tokenreduce.core.matching import bipartite_soft_matching
from tokenreduce.core.pooling import grid_pool
from tokenreduce.core.restore import restore_tokens
from tokenreduce.core.select import hash_scores, keep_indices, split_keep_drop
from tokenreduce.core.selection import Selection, choose_rows, keep, keep_and_cluster, keep_and_fuse, mix, weighted_mean_coeff

__all__ = [
    "Selection",
    "attention_probs",
    "bipartite_soft_matching",
    "choose_rows",
    "cluster_argmin",
    "cluster_selection",
    "cls_attention",
    "density_peaks",
    "farthest_first",
    "cosine_distance",
    "grid_pool",
    "max_min_subset",
    "mix",
    "nearest_centre",
    "nearest_target_merge",
    "pairwise_distances",
    "received_attention",
    "restore_tokens",
    "row_attention",
    "rows_attention",
    "strided_targets",
    "top_indices",
    "hash_scores",
    "keep",
    "keep_and_cluster",
    "keep_and_fuse",
    "keep_indices",
    "kmedoids",
    "medoid_costs",
    "size_bias",
    "split_keep_drop",
    "weighted_kmeans",
    "weighted_mean_coeff",
]
