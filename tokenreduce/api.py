"""Public API: apply / remove / applied / methods / describe / record."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from torch import nn

from tokenreduce.adapters import find_adapter
from tokenreduce.methods.base import Method
from tokenreduce.patch import ATTR, Patch
from tokenreduce.registry import method_class, method_names
from tokenreduce.state import Record, ReductionState

ModelT = TypeVar("ModelT", bound=nn.Module)


def methods() -> list[str]:
    """Names of the registered methods, for ``apply(model, name)``."""
    return method_names()


def make_method(method: str | Method, **config: Any) -> Method:
    """Build a validated method from its name and config (or pass a ready :class:`Method` through)."""
    if isinstance(method, Method):
        if config:
            raise TypeError("pass config either inside the Method object or as keywords, not both")
        return method
    if not isinstance(method, str):
        raise TypeError(f"method must be a name from {method_names()} or a Method, got {type(method).__name__}")
    cls = method_class(method)
    allowed = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise TypeError(f"method {method!r} got unknown config {unknown}; it accepts {allowed}")
    return cls(**config)


def apply(model: ModelT, method: str | Method, *, trace_source: bool = False, **config: Any) -> ModelT:
    """Patch ``model`` in place to reduce tokens with ``method`` and return it.

    ``config`` goes to the method (e.g. ``r=16`` for ``tome``). ``trace_source=True`` also records which
    original tokens each token covers (see :func:`record`). Applying again replaces the earlier patch.
    Weights and ``state_dict()`` are untouched; :func:`remove` restores the original model exactly.
    """
    method_obj = make_method(method, **config)
    adapter = find_adapter(model)
    depth = len(adapter.blocks(model))
    num_prefix = adapter.num_prefix_tokens(model)
    if method_obj.needs_cls_token and not adapter.has_cls_token(model):
        raise ValueError(f"method {method_obj.name!r} scores tokens by CLS attention; this model has no class token")
    n0 = adapter.default_num_tokens(model)
    if n0 is not None and depth:
        method_obj.schedule(n0, num_prefix, depth)  # fail at apply time, not at the first forward
    remove(model)  # only now: a bad config leaves an earlier patch in place
    patch = Patch(adapter, method_obj, ReductionState(num_prefix, depth, trace_source))
    try:
        adapter.install(model, patch)
    except BaseException:
        patch.undo()
        raise
    return model


def is_patched(model: nn.Module) -> bool:
    return isinstance(model.__dict__.get(ATTR), Patch)


def remove(model: ModelT) -> ModelT:
    """Undo :func:`apply`: original classes, no hooks, no added attributes. A no-op on an unpatched model."""
    if is_patched(model):
        model.__dict__[ATTR].undo()
    return model


@contextmanager
def applied(model: ModelT, method: str | Method, *, trace_source: bool = False, **config: Any) -> Iterator[ModelT]:
    """Context manager form of :func:`apply`; on exit the model is as it was before (including an
    earlier patch, which is re-applied)."""
    previous = patch_of(model) if is_patched(model) else None
    apply(model, method, trace_source=trace_source, **config)
    try:
        yield model
    finally:
        remove(model)
        if previous is not None:
            apply(model, previous.method, trace_source=previous.state.trace_source)


def patch_of(model: nn.Module) -> Patch:
    """The :class:`Patch` attached to ``model``; a ``ValueError`` if it is not patched."""
    if not is_patched(model):
        raise ValueError("model is not patched by tokenreduce; call tokenreduce.apply(model, ...) first")
    return model.__dict__[ATTR]


def record(model: nn.Module) -> Record:
    """Token counts per block (and sizes/sources) of the last forward of a patched model."""
    patch = patch_of(model)
    if not patch.state.schedule:
        raise ValueError("the patched model has not run a forward yet")
    return patch.state.record()


def describe(model: nn.Module) -> str:
    """A human-readable account of what tokenreduce did to ``model``."""
    if not is_patched(model):
        return f"{type(model).__name__}: not patched by tokenreduce"
    patch = patch_of(model)
    lines = [f"tokenreduce {patch.method} via adapter {patch.adapter.name!r}", f"  model: {patch.adapter.summary(model)}"]
    n0 = patch.adapter.default_num_tokens(model)
    if n0 is not None:
        plan = patch.method.schedule(n0, patch.state.num_prefix, patch.state.depth)
        lines.append(f"  tokens per block at the native input size: {n0} -> {' '.join(map(str, plan))}")
    if patch.method.paper:
        lines.append(f"  paper: {patch.method.paper}")
    return "\n".join(lines)
