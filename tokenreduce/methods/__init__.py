"""Token reduction methods: one file each, registered by name on import."""

from tokenreduce.methods import evit, none, random, tome, topk  # noqa: F401  (registration)
from tokenreduce.methods.base import EncoderMethod, LayerContext, Method, PruneAtLayers

__all__ = ["EncoderMethod", "LayerContext", "Method", "PruneAtLayers"]
