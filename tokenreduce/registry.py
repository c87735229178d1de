"""Name -> class registries for methods and adapters, filled by decorators at import time."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import torch

if TYPE_CHECKING:
    from tokenreduce.adapters.base import Adapter
    from tokenreduce.methods.base import Method

M = TypeVar("M", bound=type)
T = TypeVar("T")

_METHODS: dict[str, type[Method]] = {}
_ADAPTERS: list[type[Adapter]] = []


def loadable(obj: T) -> T:
    """Allow ``obj`` (a class or function a patched model's pickle names) in ``torch.load(weights_only=True)``."""
    torch.serialization.add_safe_globals([obj])
    return obj


def register_method(cls: M) -> M:
    """Class decorator: make a :class:`Method` reachable as ``tokenreduce.apply(model, cls.name)``."""
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} is already registered")
    _METHODS[cls.name] = cls
    return loadable(cls)  # patched models pickle their method


def register_adapter(cls: M) -> M:
    """Class decorator: add an :class:`Adapter` to the model families ``apply`` can patch."""
    _ADAPTERS.append(cls)
    return loadable(cls)  # patched models pickle their adapter


def method_names() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; method must be one of {method_names()}") from None


def adapters() -> list[type[Adapter]]:
    return list(_ADAPTERS)
