"""The object one ``apply`` attaches to a model: method, state, and an undo log of every change."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from tokenreduce.methods.base import LayerContext, Method
from tokenreduce.state import ReductionState

if TYPE_CHECKING:
    from tokenreduce.adapters.base import Adapter

ATTR = "_tokenreduce"  # the attribute holding the Patch; adapters prefix any others they add with it

CAPTURE_SLOT = "_tokenreduce_slot"

_subclasses: dict[tuple[type, type], type] = {}


def _capture(module: nn.Module, args: object, out: Tensor) -> None:
    setattr(module.__dict__[ATTR], module.__dict__[CAPTURE_SLOT], out)


def _patched_class(mixin: type, base: type) -> type:
    key = (mixin, base)
    if key not in _subclasses:
        namespace = {"_tokenreduce_base": base, "_tokenreduce_mixin": mixin, "__reduce_ex__": _reduce_ex}
        _subclasses[key] = type(f"TokenReduce{base.__name__}", (mixin, base), namespace)
    return _subclasses[key]


def _new_patched(mixin: type, base: type) -> object:
    return object.__new__(_patched_class(mixin, base))


def _reduce_ex(self: object, protocol: int):
    # The generated class cannot be found by name, so pickles (torch.save, deepcopy) name the two
    # importable classes it is made of and rebuild it on load.
    _, _, *rest = object.__reduce_ex__(self, protocol)
    cls = type(self)
    return (_new_patched, (cls._tokenreduce_mixin, cls._tokenreduce_base), *rest)


def original_class(module: nn.Module) -> type:
    """The class ``module`` had before patching (its own class when unpatched)."""
    return getattr(type(module), "_tokenreduce_base", type(module))


class Patch:
    """Method + state for one model, the adapter-neutral engine behind every patched block.

    Everything it changes on modules (swapped classes, hooks, attributes) is logged so that
    :meth:`undo` restores the model exactly; weights are never touched.
    """

    def __init__(self, adapter: Adapter, method: Method, state: ReductionState) -> None:
        self.adapter = adapter
        self.method = method
        self.state = state
        self.q: Tensor | None = None  # queries/keys of the block now running, captured by hooks
        self.k: Tensor | None = None
        self._classes: list[tuple[nn.Module, type]] = []
        self._attrs: list[tuple[nn.Module, str]] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    # -- installing and undoing -------------------------------------------------------------
    def swap_class(self, module: nn.Module, mixin: type) -> None:
        """Give ``module`` a subclass of its class with ``mixin``'s methods in front."""
        self._classes.append((module, type(module)))
        module.__class__ = _patched_class(mixin, type(module))

    def set_attr(self, module: nn.Module, name: str, value: object) -> None:
        if name in module.__dict__:
            raise RuntimeError(f"{type(module).__name__} already has an attribute {name!r}")
        module.__dict__[name] = value
        self._attrs.append((module, name))

    def capture_qk(self, q_module: nn.Module, k_module: nn.Module) -> None:
        """Record the outputs of the modules producing queries and keys ``[B, H, N, D]``."""
        for module, slot in ((q_module, "q"), (k_module, "k")):
            # The hook finds the patch through the module, not a closure, so that a deep copy of the
            # patched model writes into its own copy of the patch.
            self.set_attr(module, ATTR, self)
            self.set_attr(module, CAPTURE_SLOT, slot)
            self._hooks.append(module.register_forward_hook(_capture))

    def undo(self) -> None:
        for handle in self._hooks:
            handle.remove()
        for module, name in reversed(self._attrs):
            del module.__dict__[name]
        for module, cls in reversed(self._classes):
            module.__class__ = cls
        self._hooks, self._attrs, self._classes = [], [], []
        self.q = self.k = None

    # -- running -------------------------------------------------------------------------------
    def begin(self, x: Tensor, masked: bool = False) -> None:
        """Start a forward at the first block with tokens ``x [B, N0, C]``."""
        schedule = self.method.schedule(x.shape[1], self.state.num_prefix, self.state.depth)
        if masked and schedule[-1] != x.shape[1]:
            raise ValueError("attn_mask / is_causal cannot be combined with token reduction; use method='none'")
        self.state.reset(x, schedule)

    def attn_bias(self, dtype: torch.dtype) -> Tensor | None:
        return self.state.attn_bias(dtype) if self.method.prop_attn else None

    def reduce(self, layer: int, x: Tensor, scale: float, attn_bias: Tensor | None) -> Tensor:
        """The hook point after attention and before the MLP of block ``layer``."""
        if self.q is None or self.k is None:
            raise RuntimeError(f"block {layer} ran attention without producing queries/keys through the hooked modules")
        ctx = LayerContext(layer, self.state.num_prefix, self.state.schedule[layer], self.q, self.k, scale, attn_bias)
        self.q = self.k = None
        out = self.method.reduce(x, ctx, self.state)
        if out.shape[1] != ctx.num_out:
            raise RuntimeError(
                f"method {self.method.name} left {out.shape[1]} tokens at layer {layer}, its schedule says {ctx.num_out}"
            )
        self.state.tokens_per_layer.append(out.shape[1])
        return out
