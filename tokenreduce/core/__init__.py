"""Pure tensor operations for token reduction: no model code, no model-library imports."""

from tokenreduce.core.agglomerative import agglomerative_clustering, merge_clusters
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
from tokenreduce.core.graph import graph_propagation, grid_adjacency, knn_adjacency, normalized_adjacency
from tokenreduce.core.matching import (
    batch_soft_matching,
    best_partners,
    bipartite_soft_matching,
    merge_edges,
    redundant_half,
    threshold_soft_matching,
)
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

__all__ = [
    "Compaction",
    "Selection",
    "SpanKeep",
    "adaptive_pool_matrix",
    "agglomerative_clustering",
    "attention_probs",
    "batch_soft_matching",
    "best_partners",
    "bipartite_soft_matching",
    "choose_rows",
    "cls_attention",
    "compact",
    "cosine_distance",
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
    "merge_clusters",
    "merge_edges",
    "mix",
    "nearest_target_merge",
    "normalized_adjacency",
    "pad_prefix",
    "patchify",
    "received_attention",
    "redundant_half",
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
    "threshold_soft_matching",
    "top_k_positions",
    "weighted_mean_coeff",
    "weighted_pagerank",
    "zero_smallest",
]
