"""Model-family adapters, found by class name so that no model library is imported here."""

from __future__ import annotations

from torch import nn

from tokenreduce.adapters import (  # noqa: F401  (registration)
    diffusers_denoisers,
    hf_mllama,
    hf_video,
    hf_vision,
    hf_vlm,
    openclip_vit,
    timm_eva,
    timm_vit,
)
from tokenreduce.adapters.base import Adapter, BlockCost, class_names
from tokenreduce.registry import adapters

__all__ = ["Adapter", "BlockCost", "locate"]


def _match(module: nn.Module) -> Adapter | None:
    return next((cls() for cls in adapters() if cls.matches(module)), None)


def _refused(module: nn.Module, path: str = "") -> TypeError | None:
    """The error for ``module`` (at ``path`` in the model) if an adapter names its class as refused."""
    for name in class_names(module):
        for adapter in adapters():
            if name in adapter.refused:
                where = f" (submodule {path!r})" if path else ""
                return TypeError(f"tokenreduce cannot patch {type(module).__qualname__}{where}: {adapter.refused[name]}")
    return None


def _unsupported(model: nn.Module) -> TypeError:
    refused = next(filter(None, (_refused(m, path) for path, m in model.named_modules())), None)
    if refused is not None:
        return refused
    families = "; ".join(a.family for a in adapters())
    return TypeError(f"no tokenreduce adapter for {type(model).__qualname__}; supported model families: {families}")


def locate(model: object) -> tuple[str, nn.Module, Adapter]:
    """``(path, module, adapter)`` of the supported model to patch: ``model`` itself (path ``""``), or
    the one supported submodule of a wrapper (``torch.compile``'s ``OptimizedModule``, ``DataParallel``,
    a user module holding a backbone), or the denoiser of a diffusers pipeline (path: its component
    name). Several candidates, or none, raise a ``TypeError`` naming them; a model of a class an adapter
    refuses (or, when nothing else matches, holding one) raises its reason."""
    found: list[tuple[str, nn.Module, Adapter]] = []
    if not isinstance(model, nn.Module):
        components = getattr(model, "components", None)
        if not isinstance(components, dict):
            raise TypeError(f"model must be a torch.nn.Module or a diffusers pipeline, got {type(model).__name__}")
        # a diffusers pipeline: its denoiser among its components
        for name, module in components.items():
            adapter = _match(module) if isinstance(module, nn.Module) else None
            if adapter is not None:
                found.append((name, module, adapter))
        if not found:
            families = "; ".join(a.family for a in adapters())
            raise TypeError(
                f"{type(model).__qualname__} holds no model tokenreduce supports; supported model families: {families}"
            )
    else:
        adapter = _match(model)
        if adapter is not None:
            return "", model, adapter
        refused = _refused(model)
        if refused is not None:
            raise refused
        for name, module in model.named_modules():  # parents come before their children
            if not name or any(name.startswith(path + ".") for path, _, _ in found):
                continue
            adapter = _match(module)
            if adapter is not None:
                found.append((name, module, adapter))
    if len(found) == 1:
        return found[0]
    if found:
        names = ", ".join(f"{path!r} ({type(m).__name__})" for path, m, _ in found)
        raise TypeError(
            f"{type(model).__qualname__} holds {len(found)} supported models: {names}; "
            f"patch the one you mean, e.g. tokenreduce.apply(model.get_submodule({found[0][0]!r}), ...)"
        )
    raise _unsupported(model)
