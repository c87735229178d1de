"""Public API: apply / remove / applied / list_methods / describe / record."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from torch import nn

from tokenreduce.adapters import locate
from tokenreduce.adapters.diffusers_denoisers import DenoiserRecord
from tokenreduce.adapters.hf_mllama import CrossAttentionRecord
from tokenreduce.adapters.hf_vlm import VLMRecord
from tokenreduce.methods.base import Method
from tokenreduce.methods.stack import Stack
from tokenreduce.patch import ATTR, Patch
from tokenreduce.registry import method_classes, method_names
from tokenreduce.stages import Stage
from tokenreduce.state import Record

ModelT = TypeVar("ModelT")  # an nn.Module, or a diffusers pipeline (its denoiser is patched)


def list_methods() -> list[str]:
    """Names of the registered methods, for ``apply(model, name)``."""
    return method_names()


# A name registered at several stages acts, when nothing else decides, at the one nearest the LLM.
STAGE_PREFERENCE = (Stage.PRE_LLM, Stage.LLM, Stage.ENCODER)


def _fields(cls: type[Method]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]


def _method_class(name: str, stage: str | Stage | None, config: dict, available: tuple[Stage, ...] | None) -> type[Method]:
    """The class of method ``name`` to build: at ``stage`` if given, else among the stages the model has
    (``available``), the one whose config accepts ``config``, then the one nearest the LLM."""
    classes = method_classes(name)
    if stage is not None:
        allowed = [str(s) for s in classes]
        if str(stage) not in allowed:
            raise ValueError(f"stage must be one of {allowed} for method {name!r}, got {stage!r}")
        classes = {s: c for s, c in classes.items() if str(s) == str(stage)}
    if available is not None:
        usable = {s: c for s, c in classes.items() if s in available}
        if not usable:
            acts = ", ".join(str(s) for s in classes)
            raise ValueError(f"method {name!r} acts at stage {acts}; this model has stages {', '.join(map(str, available))}")
        classes = usable
    if len(classes) > 1:
        fitting = {s: c for s, c in classes.items() if set(config) <= set(_fields(c))}
        classes = fitting or classes
    return next(classes[s] for s in (*STAGE_PREFERENCE, *classes) if s in classes)


def make_method(method: str | Method, *, stage: str | Stage | None = None, **config: Any) -> Method:
    """Build a validated method from its name and config (or pass a ready :class:`Method` through).

    A name registered at several stages (``random``) is built at ``stage`` when given, else at the
    stage whose config accepts the keywords, else at the one nearest the LLM."""
    return _build(method, stage, config, None)


def _build(method, stage: str | Stage | None, config: dict, available: tuple[Stage, ...] | None) -> Method:
    if isinstance(method, (list, tuple)):
        return _stack(method, stage, config, available)
    if isinstance(method, Method):
        if config:
            raise TypeError("pass config either inside the Method object or as keywords, not both")
        return method
    if not isinstance(method, str):
        raise TypeError(f"method must be a name from {method_names()} or a Method, got {type(method).__name__}")
    cls = _method_class(method, stage, config, available)
    unknown = sorted(set(config) - set(_fields(cls)))
    if unknown:
        raise TypeError(f"method {method!r} at stage {cls.stage} got unknown config {unknown}; it accepts {_fields(cls)}")
    return cls(**config)


def _stack(methods: Sequence, stage, config: dict, available: tuple[Stage, ...] | None) -> Method:
    """Two methods acting one after the other: a pre-LLM one, then one inside the LLM."""
    if stage is not None or config:
        raise TypeError("stacked methods take their config each in its own (name, config) pair or Method, not as keywords")
    if len(methods) != 2:
        raise ValueError(f"a stack holds two methods (one before the LLM, one inside it), got {len(methods)}")
    built = []
    for item in methods:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], dict):
            built.append(_build(item[0], None, dict(item[1]), available))
        else:
            built.append(_build(item, None, {}, available))
    return Stack(*built)


def apply(model: ModelT, method: str | Method | Sequence, *, stage: str | Stage | None = None, **config: Any) -> ModelT:
    """Patch ``model`` in place to reduce tokens with ``method`` and return it.

    ``config`` goes to the method (e.g. ``r=16`` for ``tome``). ``stage`` picks where a method that
    exists at several stages acts (``random``: ``"encoder"`` or ``"pre_llm"``); by default it is the
    stage the model has, the one whose config fits the keywords, then the one nearest the LLM.
    Applying again replaces the earlier patch. A list of two methods, each a name, a ``(name, config)``
    pair or a :class:`Method`, stacks a pre-LLM method and an in-LLM one on a VLM:
    ``apply(vlm, [("visionzip", {"dominant": 162, "contextual": 30}), ("fastv", {"layer": 2})])``.
    A wrapper holding exactly one supported model (``torch.compile``, ``DataParallel``, your own module)
    gets that model patched, and a diffusers pipeline its unet or transformer; :func:`describe` names
    it. Weights and ``state_dict()`` are untouched;
    :func:`remove` restores the original model exactly.
    """
    _, target, adapter = locate(model)
    method_obj = _build(method, stage, config, adapter.stages)
    if method_obj.stage not in adapter.stages:
        raise ValueError(
            f"method {method_obj.name!r} acts at stage {method_obj.stage}; "
            f"{type(target).__name__} has stages {', '.join(map(str, adapter.stages))}"
        )
    adapter.validate(target, method_obj)  # fail at apply time, not at the first forward
    remove(model)  # only now: a bad config leaves an earlier patch in place
    patch = Patch(adapter, method_obj, adapter.num_prefix_tokens(target), len(adapter.blocks(target)))
    try:
        patch.set_attr(target, ATTR, patch)
        adapter.install(target, patch)
    except BaseException:
        patch.undo()
        raise
    return model


def _find_patch(model: nn.Module) -> Patch | None:
    """The patch on ``model``, or on the one supported model a wrapper holds."""
    if isinstance(model, nn.Module):
        patch = model.__dict__.get(ATTR)
        if isinstance(patch, Patch):
            return patch
    elif not isinstance(getattr(model, "components", None), dict):
        raise TypeError(f"model must be a torch.nn.Module or a diffusers pipeline, got {type(model).__name__}")
    try:
        _, target, _ = locate(model)
    except TypeError:
        return None
    patch = target.__dict__.get(ATTR)
    return patch if isinstance(patch, Patch) else None


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` (or the one supported model a wrapper of it holds) is patched."""
    return _find_patch(model) is not None


def remove(model: ModelT) -> ModelT:
    """Undo :func:`apply`: original classes, no added attributes. A no-op on an unpatched model."""
    patch = _find_patch(model)
    if patch is not None:
        patch.undo()
    return model


@contextmanager
def applied(model: ModelT, method: str | Method, **config: Any) -> Iterator[ModelT]:
    """Context manager form of :func:`apply`; on exit the model is as it was before (including an
    earlier patch, which is re-applied)."""
    previous = patch_of(model) if is_patched(model) else None
    apply(model, method, **config)
    try:
        yield model
    finally:
        remove(model)
        if previous is not None:
            apply(model, previous.method)


def patch_of(model: nn.Module) -> Patch:
    """The :class:`Patch` attached to ``model`` (or to the model a wrapper holds); a ``ValueError`` if none."""
    patch = _find_patch(model)
    if patch is None:
        raise ValueError("model is not patched by tokenreduce; call tokenreduce.apply(model, ...) first")
    return patch


def record(model: nn.Module) -> Record | VLMRecord | DenoiserRecord | CrossAttentionRecord:
    """What the calling thread's last forward of a patched model did. Each thread sees its own
    forwards, so concurrent callers never mix.

    For an encoder, a :class:`Record`: token counts per block, sizes and which original tokens each
    final token covers. For a VLM, a :class:`~tokenreduce.adapters.hf_vlm.VLMRecord` of its last prompt
    (a forward with images, or ``generate``'s prefill): what each image sent to the LLM and the
    sequence lengths the LLM read. For a diffusion denoiser (or pipeline), a
    :class:`~tokenreduce.adapters.diffusers_denoisers.DenoiserRecord` of its last call: the blocks that
    reduced and their token counts. For Mllama (Llama 3.2 Vision), a
    :class:`~tokenreduce.adapters.hf_mllama.CrossAttentionRecord` of its last prompt: the image features
    each row kept."""
    patch = patch_of(model)
    rec = patch.adapter.record(patch)
    if rec is None:
        raise ValueError(
            "the patched model has not run a forward in this thread yet (record() reports the calling thread's last forward)"
        )
    return rec


def describe(model: nn.Module) -> str:
    """A human-readable account of what tokenreduce did to ``model``."""
    if not is_patched(model):
        return f"{type(model).__name__}: not patched by tokenreduce"
    patch = patch_of(model)
    path, target, _ = locate(model)
    lines = [f"tokenreduce {patch.method} via adapter {patch.adapter.name!r}"]
    if path:
        lines.append(f"  patched submodule {path!r} of {type(model).__name__}")
    lines.append(f"  model: {patch.adapter.summary(target)}")
    lines.extend(f"  {line}" for line in patch.adapter.plan(target, patch.method))
    if patch.method.paper:
        lines.append(f"  paper: {patch.method.paper}")
    lines.append("  record(model) reports the calling thread's last forward")
    return "\n".join(lines)
