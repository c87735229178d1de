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
    density_peaks,
    grid_cells,
    local_soft_kmeans,
    nearest_target_merge,
    squared_distances,
    strided_targets,
)
from tokenreduce.core.diversity import cosine_distance, max_min_subset
from tokenreduce.core.matching import bipartite_soft_matching
from tokenreduce.core.patches import patchify
from tokenreduce.core.pooling import adaptive_pool_matrix, grid_pool, size_weighted_mean
from tokenreduce.core.positions import take_per_token
from tokenreduce.core.restore import knn_reconstruction_weights, restore_tokens
from tokenreduce.core.select import hash_scores, keep_indices, split_keep_drop, top_k_positions
from tokenreduce.core.selection import (
    Selection,
    choose_rows,
    keep,
    keep_and_cluster,
    keep_and_fuse,
    mix,
    pad_prefix,
    weighted_mean_coeff,
)

__all__ = [
    "Selection",
    "adaptive_pool_matrix",
    "attention_probs",
    "bipartite_soft_matching",
    "choose_rows",
    "cls_attention",
    "density_peaks",
    "cosine_distance",
    "grid_cells",
    "grid_pool",
    "knn_reconstruction_weights",
    "local_soft_kmeans",
    "max_min_subset",
    "mix",
    "nearest_target_merge",
    "pad_prefix",
    "patchify",
    "received_attention",
    "restore_tokens",
    "row_attention",
    "rows_attention",
    "squared_distances",
    "strided_targets",
    "hash_scores",
    "keep",
    "keep_and_cluster",
    "keep_and_fuse",
    "keep_indices",
    "size_bias",
    "size_weighted_mean",
    "split_keep_drop",
    "take_per_token",
    "top_k_positions",
    "weighted_mean_coeff",
]
