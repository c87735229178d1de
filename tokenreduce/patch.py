"""The object one ``apply`` attaches to a model: method, config, an undo log of every change, and the
per-thread slot that holds each forward call's state."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from tokenreduce.core import size_bias, tubelets_as_image
from tokenreduce.methods.base import Hook, LayerContext, Method
from tokenreduce.registry import loadable
from tokenreduce.state import ForwardState

if TYPE_CHECKING:
    from tokenreduce.adapters.base import Adapter

ATTR = "_tokenreduce"  # the attribute holding the Patch; adapters prefix any others they add with it
CAPTURE_SLOT = "_tokenreduce_slot"
CAPTURE_HEADS = "_tokenreduce_heads"
CAPTURE_CHUNK = "_tokenreduce_chunk"

_subclasses: dict[tuple[type, type], type] = {}


def _patched_class(mixin: type, base: type) -> type:
    key = (mixin, base)
    if key not in _subclasses:
        namespace = {"_tokenreduce_base": base, "_tokenreduce_mixin": mixin, "__reduce_ex__": _reduce_ex}
        # The base's name, so that lookups by class name (diffusers' compile_repeated_blocks, accelerate's
        # no-split modules, a model's repr) still find the patched module; the qualified name tells them apart.
        namespace["__qualname__"] = f"TokenReduce{base.__qualname__}"
        cls = type(base.__name__, (mixin, base), namespace)
        # The weights-only unpickler only rebuilds instances of allowed classes; the name is unique
        # so that two bases sharing a class name do not shadow each other in its table.
        full = f"{__name__}.{mixin.__module__}.{mixin.__qualname__}+{base.__module__}.{base.__qualname__}"
        torch.serialization.add_safe_globals([(cls, full)])
        _subclasses[key] = cls
    return _subclasses[key]


@loadable
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


@loadable
class CaptureOutput:
    """Mixed in front of the modules whose outputs are a block's queries and keys: stores the output
    in the running forward's state (``q`` or ``k``, as the module's slot says) as ``[B, H, N, D]``."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)  # type: ignore[misc]
        heads, chunk = getattr(self, CAPTURE_HEADS), getattr(self, CAPTURE_CHUNK, None)
        captured = out if chunk is None else out.chunk(chunk[1], dim=-1)[chunk[0]]
        # A projection's [B, N, H * D] output is split into heads the way the attention itself does.
        captured = captured if heads is None else captured.unflatten(-1, (heads, -1)).transpose(1, 2)
        setattr(self._tokenreduce_target(), getattr(self, CAPTURE_SLOT), captured)
        return out

    def _tokenreduce_target(self):
        """The object the output is stored on: the running encoder forward's state."""
        return getattr(self, ATTR).current()


@loadable
class CaptureImage:
    """Mixed in front of a model's patch embedding (a convolution with stride equal to its kernel):
    keeps its input image in the calling thread until the first block starts the forward's state; a
    video's tubelets (``Conv3d``) as one tall image (:func:`~tokenreduce.core.tubelets_as_image`)."""

    def forward(self, x: Tensor, *args, **kwargs):
        image = x if x.dim() == 4 else tubelets_as_image(x, self.kernel_size[0], self.kernel_size[1:])
        getattr(self, ATTR).local.image = image
        return super().forward(x, *args, **kwargs)  # type: ignore[misc]


@loadable
class Patch:
    """Method + config for one model, the adapter-neutral engine behind every patched block.

    Everything it changes on modules (swapped classes, attributes) is logged so that :meth:`undo`
    restores the model exactly; weights are never touched. The state of a forward call lives in a
    thread-local slot, so threads calling one patched model never see each other's tokens.
    """

    def __init__(self, adapter: Adapter, method: Method, num_prefix: int, depth: int) -> None:
        self.adapter = adapter
        self.method = method
        self.num_prefix = num_prefix
        self.depth = depth
        self.patch_size: tuple[int, int] | None = None  # set when the patch embedding's input is captured
        self._local = threading.local()
        self._classes: list[tuple[nn.Module, type]] = []
        self._attrs: list[tuple[nn.Module, str]] = []
        self._replaced: list[tuple[nn.Module, str, object]] = []

    def __getstate__(self) -> dict:
        # Forward states are per thread and per call: a copy or a pickle starts without any.
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    # -- installing and undoing -------------------------------------------------------------
    def swap_class(self, module: nn.Module, mixin: type) -> None:
        """Give ``module`` a subclass of its class with ``mixin``'s methods in front."""
        self._classes.append((module, type(module)))
        module.__class__ = _patched_class(mixin, type(module))

    def replace_attr(self, module: nn.Module, name: str, value: object) -> None:
        """Give ``module`` another plain attribute ``name`` until :meth:`undo` puts the old one back."""
        self._replaced.append((module, name, module.__dict__[name]))
        module.__dict__[name] = value

    def set_attr(self, module: nn.Module, name: str, value: object) -> None:
        if name in module.__dict__:
            raise RuntimeError(f"{type(module).__name__} already has an attribute {name!r}")
        module.__dict__[name] = value
        self._attrs.append((module, name))

    def capture_qk(self, q_module: nn.Module, k_module: nn.Module, heads: int | None = None) -> None:
        """Record the outputs of the modules producing queries and keys: ``[B, H, N, D]``, or
        ``[B, N, heads * D]`` to be split into ``heads`` when ``heads`` is given."""
        self.capture(q_module, "q", heads)
        self.capture(k_module, "k", heads)

    def capture(
        self,
        module: nn.Module,
        slot: str,
        heads: int | None = None,
        mixin: type = CaptureOutput,
        chunk: tuple[int, int] | None = None,
    ) -> None:
        """Store ``module``'s output in the running state's field ``slot``: chunk ``chunk = (i, n)`` of
        ``n`` along the last dimension when given, split into ``heads`` when given."""
        # The module finds the patch through its own attribute, not a closure, so that a deep copy
        # of the patched model writes into its own copy of the patch.
        self.set_attr(module, ATTR, self)
        self.set_attr(module, CAPTURE_SLOT, slot)
        self.set_attr(module, CAPTURE_HEADS, heads)
        if chunk is not None:
            self.set_attr(module, CAPTURE_CHUNK, chunk)
        self.swap_class(module, mixin)

    def capture_image(self, conv: nn.Module) -> None:
        """Keep the input of the patch embedding ``conv`` (``[B, C, H, W]``) for the method
        (:attr:`LayerContext.image`), when the method has ``needs_image``. The patch embedding runs
        before the first block creates the forward's state, so the image waits in this thread's slot
        and :meth:`begin` moves it into the state. A ``Conv3d`` embeds a video ``[B, C, T, H, W]`` in
        tubelets, which the method sees as one tall image of their patches."""
        if (
            not isinstance(conv, (nn.Conv2d, nn.Conv3d))
            or conv.stride != conv.kernel_size
            or not (conv.padding == "valid" or not any(conv.padding))
        ):
            raise TypeError(
                f"method {self.method.name!r} reads the pixels of each patch; the patch embedding must be a Conv2d (or "
                f"a video's Conv3d) with stride equal to its kernel and no padding, got {conv!r}"
            )
        self.patch_size = tuple(conv.kernel_size[-2:])  # type: ignore[assignment]
        self.set_attr(conv, ATTR, self)
        self.swap_class(conv, CaptureImage)

    def undo(self) -> None:
        for module, name, value in reversed(self._replaced):
            module.__dict__[name] = value
        for module, name in reversed(self._attrs):
            del module.__dict__[name]
        for module, cls in reversed(self._classes):
            module.__class__ = cls
        self._attrs, self._classes, self._replaced = [], [], []

    # -- running -------------------------------------------------------------------------------
    def begin(self, x: Tensor, masked: bool = False) -> ForwardState:
        """Start a forward call at the first block with tokens ``x [B, N0, C]``."""
        schedule = self.method.schedule(x.shape[1], self.num_prefix, self.depth)
        # also a method that rebuilds every token at the end, or one whose counts depend on the image
        reduces = any(n != x.shape[1] for n in schedule) or self.method.variable_counts
        if masked and reduces:
            raise ValueError("attn_mask / is_causal cannot be combined with token reduction; use method='none'")
        if reduces and torch.jit.is_tracing():
            # A trace freezes data-dependent indices (which tokens merge) into constants and would
            # replay this input's merges on every other input.
            raise RuntimeError(
                "torch.jit.trace (and the legacy torch.onnx.export(dynamo=False)) cannot record token reduction; "
                "use torch.export.export(model, args) or torch.onnx.export(model, args, dynamo=True)"
            )
        state = ForwardState.start(x, self.num_prefix, schedule)
        if self.patch_size is not None:
            # The image this thread's patch embedding just saw; taken, so that a later forward on
            # ready-made tokens cannot pick it up.
            state.image = getattr(self._local, "image", None)
            self._local.image = None
        self._local.state = state
        return state

    def latest(self) -> ForwardState | None:
        """The state of this thread's running or last forward call, ``None`` before its first."""
        return getattr(self._local, "state", None)

    def current(self) -> ForwardState:
        """The state of the forward call running in this thread."""
        state = self.latest()
        if state is None:
            raise RuntimeError("a patched block ran outside a forward call: the first block starts each call")
        return state

    @property
    def local(self) -> threading.local:
        """This patch's per-thread namespace, for adapters that keep per-thread state of their own."""
        return self._local

    def attend(
        self, state: ForwardState, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float, attn_bias: Tensor | None
    ) -> Tensor:
        """The attention map block ``layer`` uses, from a method that edits attention."""
        ctx = self._context(state, layer, (q, k, v), scale, attn_bias, Hook.ATTN)
        probs = self.method.attend(ctx)
        state.carry = ctx.carry
        return probs

    def _context(
        self,
        state: ForwardState,
        layer: int,
        qkv: tuple[Tensor | None, Tensor | None, Tensor | None],
        scale: float,
        attn_bias: Tensor | None,
        hook: Hook,
    ) -> LayerContext:
        q, k, v = qkv
        return LayerContext(
            layer,
            self.num_prefix,
            state.schedule[layer],
            q,
            k,
            scale,
            attn_bias,
            state.size,
            v,
            hook,
            state.carry,
            state.block_input,
            self.depth,
            state.image,
            self.patch_size,
            state.input_tokens,
        )

    def attn_bias(self, state: ForwardState, dtype: torch.dtype) -> Tensor | None:
        return state.attn_bias(dtype) if self.method.prop_attn else None

    def pool_bias(self, keys: Tensor) -> Tensor | None:
        """The proportional-attention bias ``[B, 1, 1, S]`` for an attention pool (a head's latent queries)
        over ``keys [B, S, C]``, the last ``S`` tokens of this thread's forward (all of them, or those after
        the prefix): ``None`` unless the method uses proportional attention and tokens were merged."""
        state = self.latest()
        if not self.method.prop_attn or state is None or state.size is None:
            return None
        size = state.size
        if size.shape[0] != keys.shape[0] or size.shape[1] < keys.shape[1]:
            return None  # not this forward's tokens
        return size_bias(size[:, size.shape[1] - keys.shape[1] :], keys.dtype)

    def reduce(
        self,
        state: ForwardState,
        layer: int,
        x: Tensor,
        scale: float,
        attn_bias: Tensor | None,
        hook: Hook = Hook.ATTN,
        qkv: tuple[Tensor | None, Tensor | None, Tensor | None] | None = None,
    ) -> Tensor:
        """The method's hook point in block ``layer``: at its start (``qkv`` projected from ``x`` when the
        method asks, else those of the previous block's attention, ``None`` at block 0), after
        attention, or after the MLP (``q``/``k``/``v`` those attention used)."""
        if qkv is None:
            if hook is not Hook.START and (state.q is None or state.k is None):
                raise RuntimeError(f"block {layer} ran attention without producing queries/keys through the hooked modules")
            qkv = (state.q, state.k, state.v)
        ctx = self._context(state, layer, qkv, scale, attn_bias, hook)
        state.q = state.k = state.v = None
        selection = self.method.select(x, ctx)
        state.carry = ctx.carry
        left = x.shape[1] if selection is None else selection.num_out
        # A method with per-image counts may leave fewer (its rows padded to the longest); never more.
        if left != ctx.num_out and not (self.method.variable_counts and left <= ctx.num_out):
            what = "kept all" if selection is None else "left"
            raise RuntimeError(
                f"method {self.method.name} {what} {left} tokens at layer {layer}, its schedule says {ctx.num_out}"
            )
        if selection is not None:
            x = state.follow(selection, x, layer)
        state.tokens_per_layer.append(x.shape[1])
        return x
