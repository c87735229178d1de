"""Model-family adapters, found by class name so that no model library is imported here."""

from tokenreduce.adapters import timm_vit  # noqa: F401  (registration)
from tokenreduce.adapters.base import Adapter, BlockCost
from tokenreduce.registry import adapters

__all__ = ["Adapter", "BlockCost", "find_adapter"]


def find_adapter(model: object) -> Adapter:
    """The adapter for ``model``; a ``TypeError`` listing the supported families if there is none."""
    import torch.nn as nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for cls in adapters():
        if cls.matches(model):
            return cls()
    families = "; ".join(a.family for a in adapters())
    raise TypeError(f"no tokenreduce adapter for {type(model).__qualname__}; supported model families: {families}")
