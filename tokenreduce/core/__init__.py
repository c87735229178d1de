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
from tokenreduce.core.clustering import (
    density_peaks,
    grid_cells,
    local_soft_kmeans,
    nearest_target_merge,
    squared_distances,
    strided_targets,
)
from tokenreduce.core.diversity import cosine_distance, max_min_subset
from tokenreduce.core.fusion import rescale_to_max_norm
from tokenreduce.core.graph import graph_propagation, grid_adjacency, knn_adjacency, normalized_adjacency
from tokenreduce.core.matching import bipartite_merge, bipartite_soft_matching, redundant_half
from tokenreduce.core.patches import patchify
from tokenreduce.core.pooling import adaptive_pool_matrix, grid_pool, size_weighted_mean
from tokenreduce.core.positions import take_per_token
from tokenreduce.core.restore import knn_reconstruction_weights, restore_tokens
from tokenreduce.core.select import hash_scores, keep_indices, split_keep_drop, stable_order, top_k_positions
from tokenreduce.core.selection import (
    Selection,
    choose_rows,
    first_inputs,
    keep,
    keep_and_cluster,
    keep_and_fuse,
    mix,
    pad_prefix,
    weighted_mean_coeff,
)
from tokenreduce.core.sequence import Compaction, SpanKeep, compact, image_spans
from tokenreduce.core.spectral import dct_lowpass, dct_matrix

__all__ = [
    "Compaction",
    "Selection",
    "SpanKeep",
    "adaptive_pool_matrix",
    "attention_probs",
    "bipartite_merge",
    "bipartite_soft_matching",
    "choose_rows",
    "cls_attention",
    "compact",
    "cosine_distance",
    "dct_lowpass",
    "dct_matrix",
    "density_peaks",
    "first_inputs",
    "graph_propagation",
    "grid_adjacency",
    "grid_cells",
    "grid_pool",
    "hash_scores",
    "head_rms",
    "image_spans",
    "keep",
    "keep_and_cluster",
    "keep_and_fuse",
    "keep_indices",
    "knn_adjacency",
    "knn_reconstruction_weights",
    "local_soft_kmeans",
    "max_min_subset",
    "mix",
    "nearest_target_merge",
    "normalized_adjacency",
    "pad_prefix",
    "patchify",
    "received_attention",
    "redundant_half",
    "rescale_to_max_norm",
    "restore_tokens",
    "row_attention",
    "rows_attention",
    "size_bias",
    "size_weighted_mean",
    "split_keep_drop",
    "squared_distances",
    "stable_order",
    "strided_targets",
    "take_per_token",
    "top_k_positions",
    "weighted_mean_coeff",
    "weighted_pagerank",
    "zero_smallest",
]
