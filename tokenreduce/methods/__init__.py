"""Token reduction methods: one file each, registered by name on import."""

from tokenreduce.methods import dart, divprune, evit, fastv, none, pdrop, pool, random, sparsevlm, tome, topk, visionzip  # noqa: F401
from tokenreduce.methods.base import EncoderMethod, LayerContext, Method, PruneAtLayers
from tokenreduce.methods.visual import VisualContext, VisualMethod

__all__ = ["EncoderMethod", "LayerContext", "Method", "PruneAtLayers", "VisualContext", "VisualMethod"]
