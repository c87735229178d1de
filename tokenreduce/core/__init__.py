"""Pure tensor operations for token reduction: no model code, no model-library imports."""

from tokenreduce.core.attention import (
    attention_probs,
    cls_attention,
    received_attention,
    row_attention,
    rows_attention,
    size_bias,
)
from tokenreduce.core.clustering import density_peaks, nearest_target_merge, strided_targets
from tokenreduce.core.diversity import cosine_distance, max_min_subset
from tokenreduce.core.matching import bipartite_soft_matching
from tokenreduce.core.mixing import transform_to_targets, vote_and_mix
from tokenreduce.core.pooling import grid_pool
from tokenreduce.core.restore import restore_tokens
from tokenreduce.core.select import descending_order, hash_scores, keep_indices, split_keep_drop
from tokenreduce.core.selection import Selection, choose_rows, keep, keep_and_cluster, keep_and_fuse, mix, weighted_mean_coeff

__all__ = [
    "Selection",
    "attention_probs",
    "bipartite_soft_matching",
    "choose_rows",
    "cls_attention",
    "density_peaks",
    "descending_order",
    "cosine_distance",
    "grid_pool",
    "max_min_subset",
    "mix",
    "nearest_target_merge",
    "received_attention",
    "restore_tokens",
    "row_attention",
    "rows_attention",
    "strided_targets",
    "hash_scores",
    "keep",
    "keep_and_cluster",
    "keep_and_fuse",
    "keep_indices",
    "size_bias",
    "split_keep_drop",
    "transform_to_targets",
    "vote_and_mix",
    "weighted_mean_coeff",
]
