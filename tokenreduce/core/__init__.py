"""Pure tensor operations for token reduction: no model code, no model-library imports."""

from tokenreduce.core.attention import cls_attention, size_bias
from tokenreduce.core.matching import BipartiteMatch, bipartite_soft_matching, merge_wavg
from tokenreduce.core.select import fuse_tokens, gather_tokens, hash_scores, keep_indices, split_keep_drop

__all__ = [
    "BipartiteMatch",
    "bipartite_soft_matching",
    "cls_attention",
    "fuse_tokens",
    "gather_tokens",
    "hash_scores",
    "keep_indices",
    "merge_wavg",
    "size_bias",
    "split_keep_drop",
]
