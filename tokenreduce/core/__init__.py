"""Pure tensor operations for token reduction: no model code, no model-library imports."""

from tokenreduce.core.attention import (
    attention_probs,
    cls_attention,
    head_rms,
    received_attention,
    row_attention,
    rows_attention,
    size_bias,
    weighted_pagerank,
    zero_smallest,
)
from tokenreduce.core.clustering import density_peaks, nearest_target_merge, strided_targets
from tokenreduce.core.diversity import cosine_distance, max_min_subset
from tokenreduce.core.graph import graph_propagation, grid_adjacency, knn_adjacency, normalized_adjacency
from tokenreduce.core.matching import bipartite_soft_matching, redundant_half
from tokenreduce.core.pooling import grid_pool
from tokenreduce.core.restore import restore_tokens
from tokenreduce.core.select import hash_scores, keep_indices, split_keep_drop, stable_order
from tokenreduce.core.selection import Selection, choose_rows, keep, keep_and_cluster, keep_and_fuse, mix, weighted_mean_coeff

__all__ = [
    "Selection",
    "attention_probs",
    "bipartite_soft_matching",
    "choose_rows",
    "cls_attention",
    "density_peaks",
    "cosine_distance",
    "graph_propagation",
    "grid_adjacency",
    "grid_pool",
    "head_rms",
    "max_min_subset",
    "mix",
    "nearest_target_merge",
    "normalized_adjacency",
    "received_attention",
    "redundant_half",
    "restore_tokens",
    "row_attention",
    "rows_attention",
    "strided_targets",
    "hash_scores",
    "keep",
    "keep_and_cluster",
    "keep_and_fuse",
    "keep_indices",
    "knn_adjacency",
    "size_bias",
    "split_keep_drop",
    "stable_order",
    "weighted_mean_coeff",
    "weighted_pagerank",
    "zero_smallest",
]
