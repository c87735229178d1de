"""The adapter interface: one per model family, knowing where tokens flow."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from tokenreduce.methods.base import EncoderMethod, Method
from tokenreduce.patch import Patch
from tokenreduce.stages import Stage


def class_names(model: nn.Module) -> Iterator[str]:
    """``module.QualName`` of every class in the model's MRO, so families match without importing them."""
    for cls in type(model).__mro__:
        yield f"{cls.__module__}.{cls.__qualname__}"


def nlc_intermediates(
    forward_intermediates: Callable, x, args: tuple, kwargs: dict
) -> tuple[inspect.BoundArguments, object, bool]:
    """Call a model's own (bound) ``forward_intermediates`` as asked, except that intermediates asked for as
    NCHW grids, which the model reshapes from patch tokens that fewer tokens cannot fill, come back NLC for
    the caller to spread over the grid. Returns ``(arguments, output, spread)``: ``spread`` says whether
    they were asked for as NCHW."""
    bound = inspect.signature(forward_intermediates).bind(x, *args, **kwargs)
    bound.apply_defaults()
    spread = bound.arguments["output_fmt"] == "NCHW"
    if spread:
        bound.arguments["output_fmt"] = "NLC"
    return bound, forward_intermediates(*bound.args, **bound.kwargs), spread


@dataclass(frozen=True)
class BlockCost:
    """Per-block multiply-accumulate counts the FLOP model needs (see ``bench.flops``)."""

    attn_macs_per_token: int  # linear layers on the attention side (qkv, proj)
    attn_dim: int  # width of q and k, for the quadratic QK^T and AV terms
    mlp_macs_per_token: int  # linear layers of the MLP


class Adapter(ABC):
    """Knows one model family: its blocks, prefix tokens, attention, and how to patch them."""

    name: ClassVar[str]
    family: ClassVar[str]  # human-readable list of supported classes, for error messages
    stages: ClassVar[tuple[Stage, ...]] = (Stage.ENCODER,)
    # Classes of the family known not to fit (qualified name -> why): a model that is or holds one is
    # refused with the reason, not with a bare "no adapter", and never patched through a submodule.
    refused: ClassVar[dict[str, str]] = {}

    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter handles ``model`` (decided from class names only)."""

    @abstractmethod
    def num_prefix_tokens(self, model: nn.Module) -> int: ...

    @abstractmethod
    def has_cls_token(self, model: nn.Module) -> bool: ...

    @abstractmethod
    def blocks(self, model: nn.Module) -> list[nn.Module]: ...

    @abstractmethod
    def default_num_tokens(self, model: nn.Module) -> int | None:
        """Token count entering the first block at the model's native input size, if fixed."""

    @abstractmethod
    def install(self, model: nn.Module, patch: Patch) -> None:
        """Patch ``model`` through ``patch`` (whose undo log makes it reversible; ``model`` already
        holds the patch). Must raise a ``TypeError`` naming the part it cannot handle rather than
        patch partially."""

    @abstractmethod
    def block_costs(self, model: nn.Module) -> list[BlockCost]: ...

    @abstractmethod
    def stem_head_macs(self, model: nn.Module, num_tokens: int) -> int:
        """MACs outside the blocks (patch embedding, head) for ``num_tokens`` input tokens."""

    def summary(self, model: nn.Module) -> str:
        return type(model).__name__

    def validate(self, model: nn.Module, method: Method) -> None:
        """Raise if ``method`` cannot run on ``model`` (checked at ``apply``, before anything is patched)."""
        if method.needs_cls_token and not self.has_cls_token(model):
            raise ValueError(f"method {method.name!r} scores tokens by CLS attention; this model has no class token")
        n0 = self.default_num_tokens(model)
        depth = len(self.blocks(model))
        if isinstance(method, EncoderMethod) and n0 is not None and depth:
            method.schedule(n0, self.num_prefix_tokens(model), depth)

    def record(self, patch: Patch) -> object | None:
        """What the calling thread's last forward did (``None`` before its first)."""
        state = patch.latest()
        return None if state is None else state.record()

    def plan(self, model: nn.Module, method: Method) -> list[str]:
        """Lines for :func:`tokenreduce.describe` saying what ``method`` will do to ``model``."""
        if not isinstance(method, EncoderMethod):
            return []
        lines = []
        if method.edits_attention:
            lines.append("attention runs eagerly in every block: the method edits the attention map")
        n0 = self.default_num_tokens(model)
        if n0 is not None:
            plan = method.schedule(n0, self.num_prefix_tokens(model), len(self.blocks(model)))
            bound = " (at most: the counts depend on the image)" if method.variable_counts else ""
            lines.insert(0, f"tokens per block at the native input size: {n0} -> {' '.join(map(str, plan))}{bound}")
        return lines
