"""tokenreduce: training-free token reduction for pretrained vision transformers.

>>> import timm, torch, tokenreduce
>>> model = timm.create_model("vit_small_patch16_224").eval()
>>> _ = tokenreduce.apply(model, "tome")     # patch in place, weights untouched
>>> _ = model(torch.randn(2, 3, 224, 224))
>>> tokenreduce.record(model).tokens_per_layer[-1]
41
>>> _ = tokenreduce.remove(model)            # back to the original, bit for bit
"""

from tokenreduce import methods as _methods  # noqa: F401  (registers the methods)
from tokenreduce.api import applied, apply, describe, is_patched, list_methods, make_method, record, remove
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
    "list_methods",
    "make_method",
    "record",
    "remove",
]
__version__ = "0.1.0"
