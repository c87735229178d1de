"""tokenreduce: training-free token reduction for pretrained vision transformers.

>>> import timm, tokenreduce
>>> model = timm.create_model("vit_small_patch16_224")
>>> tokenreduce.apply(model, "tome", r=16)   # patch in place, weights untouched
>>> tokenreduce.remove(model)                # back to the original, bit for bit
"""

from tokenreduce import methods as _methods  # noqa: F401  (registers the methods)
from tokenreduce.api import applied, apply, describe, is_patched, make_method, methods, record, remove
from tokenreduce.methods.base import LayerContext, Method
from tokenreduce.state import Record

__all__ = [
    "LayerContext",
    "Method",
    "Record",
    "applied",
    "apply",
    "describe",
    "is_patched",
    "make_method",
    "methods",
    "record",
    "remove",
]
__version__ = "0.1.0"
