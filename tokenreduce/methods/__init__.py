"""Token reduction methods: one file each, registered by name when this package is imported.

Every module here is imported, so a new method is one new file with a ``@register_method`` class.
"""

import importlib
import pkgutil

from tokenreduce.methods.base import EncoderMethod, Hook, LayerContext, Method, PruneAtLayers
from tokenreduce.methods.denoiser import DenoiserContext, DenoiserMethod, Part, Recompute
from tokenreduce.methods.visual import VideoLayout, VisualContext, VisualMethod

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "DenoiserContext",
    "DenoiserMethod",
    "EncoderMethod",
    "Hook",
    "LayerContext",
    "Method",
    "Part",
    "PruneAtLayers",
    "Recompute",
    "VideoLayout",
    "VisualContext",
    "VisualMethod",
]
