"""Registries of methods (by name, one class per stage) and adapters, filled by decorators at import time."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import torch

if TYPE_CHECKING:
    from tokenreduce.adapters.base import Adapter
    from tokenreduce.methods.base import Method
    from tokenreduce.stages import Stage

M = TypeVar("M", bound=type)
T = TypeVar("T")

_METHODS: dict[str, dict[Stage, type[Method]]] = {}
_ADAPTERS: list[type[Adapter]] = []


def loadable(obj: T) -> T:
    """Allow ``obj`` (a class or function a patched model's pickle names) in ``torch.load(weights_only=True)``."""
    torch.serialization.add_safe_globals([obj])
    return obj


def register_method(cls: M) -> M:
    """Class decorator: make a :class:`Method` reachable as ``tokenreduce.apply(model, cls.name)``. One
    name may have one class per stage (``random`` prunes inside an encoder and before an LLM)."""
    stages = _METHODS.setdefault(cls.name, {})
    if cls.stage in stages:
        raise ValueError(f"method {cls.name!r} is already registered at stage {cls.stage}")
    stages[cls.stage] = cls
    return loadable(cls)  # patched models pickle their method


def register_adapter(cls: M) -> M:
    """Class decorator: add an :class:`Adapter` to the model families ``apply`` can patch."""
    _ADAPTERS.append(cls)
    return loadable(cls)  # patched models pickle their adapter


def method_names() -> list[str]:
    return sorted(_METHODS)


def method_classes(name: str) -> dict[Stage, type[Method]]:
    """The classes registered under ``name``, by stage."""
    try:
        return dict(_METHODS[name])
    except KeyError:
        raise ValueError(f"unknown method {name!r}; method must be one of {method_names()}") from None


def adapters() -> list[type[Adapter]]:
    return list(_ADAPTERS)
