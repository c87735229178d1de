"""Transformer blocks as data: the encoder-stage hook point shared by every encoder family.

Blocks are not re-implemented: the patched forward calls the block's own submodules in the order its
:class:`BlockLayout` names, and that order is checked against the block's original forward when
patching, so a library release that changes the block raises instead of computing something else.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenreduce.methods.base import Hook
from tokenreduce.patch import ATTR, Patch
from tokenreduce.registry import loadable

QKV = tuple[Tensor, Tensor, Tensor]


@loadable
@dataclass(frozen=True)
class BlockLayout:
    """A residual block: each branch as names applied in order, and where its attention is.

    A branch name may also name a bare parameter (a layer scale kept as a tensor, EVA's ``gamma_1``),
    which multiplies, or an attribute that is ``None``, which is skipped; a dotted name reaches into a
    submodule whose own forward does more than the branch (VideoMAE's ``output.dense``, where ``output``
    also adds the residual). ``attention`` (a name in ``attn``) receives the mask under ``mask_kwarg``
    (``None``: the block takes no mask, and tokenreduce runs its attention) and the block's other
    keyword arguments; a tuple result (Hugging Face's ``(output, weights)``) is reduced to its first
    item. ``params`` names the block forward's positional parameters after the tokens. ``query`` and
    ``key`` are the attention submodules whose outputs are the queries and keys, ``[B, H, N, D]``, or
    ``[B, N, H * D]`` when ``split_heads``; ``value`` is the submodule whose output holds the values,
    ``[B, N, H * D]``, as chunk ``value_chunk = (i, n)`` of ``n`` along its last dimension when given
    (timm's fused ``qkv``);
    ``scale`` (an attribute path, or a function of the attention) and ``heads`` are read on the
    attention. ``project`` computes ``(q, k, v)`` ``[B, H, N, D]`` of the attention module from its
    input, as the attention itself does (for methods acting at the block input); ``attend`` finishes
    the attention from given softmax probabilities ``[B, H, N, N]`` and ``v`` (for methods that edit
    the attention map; default: ``finish`` of ``probs @ v``).

    Attention that leaves its queries and keys in no submodule's output (projected with fused
    parameters inside one call, as ``nn.MultiheadAttention`` does, or rotated by a rotary embedding
    after the last submodule, as EVA's) has ``query = key = value = None``: tokenreduce then runs that
    attention itself, as ``project``, scaled-dot-product attention (with the probability dropout
    ``dropout``, an attribute path holding a float or an ``nn.Dropout``) and ``finish``, which turns the
    heads' outputs ``[B, H, N, D]`` into the module's output; the block's check when patching
    compares that against the block's own forward.

    ``token_kwargs`` are keyword arguments of the block that hold one row per token after the prefix
    tokens (rotary embeddings: ``[N - P, D]``, ``[H, N - P, D]`` or ``[B, H, N - P, D]``). They follow
    the tokens: each reduced token gets the row of the token whose position it inherits
    (:attr:`~tokenreduce.core.Selection.index`), and they reach ``project`` as keyword arguments.
    """

    attn: tuple[str, ...]
    mlp: tuple[str, ...]
    attention: str
    mask_kwarg: str | None
    params: tuple[str, ...]
    query: str | None
    key: str | None
    split_heads: bool
    scale: str | Callable[[nn.Module], float]
    heads: str
    value: str | None
    value_chunk: tuple[int, int] | None
    project: Callable[..., QKV]
    attend: Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor] | None = None
    finish: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None
    dropout: str = "attn_drop"
    token_kwargs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.finish is None and (self.attend is None or self.runs_attention):
            raise ValueError("a layout needs finish, or attend and the modules whose outputs are the queries and keys")
        if self.mask_kwarg is None and not self.runs_attention:
            raise ValueError("a block that takes no mask (mask_kwarg=None) needs tokenreduce to run its attention (query=None)")

    @property
    def runs_attention(self) -> bool:
        """Whether tokenreduce runs the attention itself (no submodule outputs its queries and keys)."""
        return self.query is None

    def scale_of(self, attention: nn.Module) -> float:
        return self.scale(attention) if callable(self.scale) else _attr(attention, self.scale)

    def project_input(self, block: nn.Module, x: Tensor, tables: dict | None = None) -> QKV:
        """``(q, k, v)`` that the block's attention would compute on the block input ``x`` (``tables``:
        the block's ``token_kwargs`` for these tokens)."""
        for name in self.attn:
            if name == self.attention:
                return self.project(getattr(block, name), x, **(tables or {}))
            x = _step(block, name, x)
        raise AssertionError(f"attention {self.attention!r} is not in the attention branch {self.attn}")

    def run_attn(self, block: nn.Module, x: Tensor, mask: Tensor | None, kwargs: dict, state=None) -> Tensor:
        """The attention branch on ``x``; where tokenreduce runs the attention itself, the queries, keys
        and values it used are stored on ``state`` (the running :class:`~tokenreduce.state.ForwardState`)."""
        for name in self.attn:
            if name == self.attention:
                if self.runs_attention:
                    x = self._attention(getattr(block, name), x, mask, kwargs, state)
                    continue
                x = getattr(block, name)(x, **{self.mask_kwarg: mask}, **kwargs)
                if isinstance(x, tuple):
                    x = x[0]
            else:
                x = _step(block, name, x)
        return x

    def _attention(self, attention: nn.Module, x: Tensor, mask: Tensor | None, kwargs: dict, state) -> Tensor:
        causal = bool(kwargs.get("is_causal", False))
        extra = [k for k, v in kwargs.items() if k not in self.token_kwargs and k != "is_causal" and v is not None]
        if extra:
            raise TypeError(f"{type(attention).__qualname__} is run by tokenreduce, which does not pass {extra}")
        q, k, v = self.project(attention, x, **{k: kwargs[k] for k in self.token_kwargs if kwargs.get(k) is not None})
        if state is not None:
            state.q, state.k, state.v = q, k, v
        dropout = _attr(attention, self.dropout)
        p = (dropout.p if isinstance(dropout, nn.Dropout) else float(dropout)) if attention.training else 0.0
        if getattr(attention, "fused_attn", True):
            # SDPA's default scale, 1 / sqrt(D), as the modules run here use; verify_layout checks it against
            # ``scale``, which the eager path applies.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        else:  # the module was asked for eager attention (timm's fused_attn = False)
            logits = (q * self.scale_of(attention)) @ k.transpose(-2, -1)
            if causal:
                logits = logits.masked_fill(torch.ones_like(logits, dtype=torch.bool).triu(1), float("-inf"))
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
            probs = logits.softmax(dim=-1)
            out = F.dropout(probs, p) @ v
        return self.finish(attention, x, out)

    def run_attn_edited(
        self,
        block: nn.Module,
        x: Tensor,
        probs: Callable[[Tensor, Tensor, Tensor], Tensor],
        tables: dict | None = None,
        state=None,
    ) -> Tensor:
        """The attention branch computed eagerly, its softmax probabilities ``probs(q, k, v)`` given by the
        caller (a method that edits or replaces the attention map); ``tables`` and ``state`` as in
        :meth:`project_input` and :meth:`run_attn`."""
        for name in self.attn:
            if name == self.attention:
                attention = getattr(block, name)
                q, k, v = self.project(attention, x, **(tables or {}))
                if state is not None and self.runs_attention:  # elsewhere the hooked modules kept them
                    state.q, state.k, state.v = q, k, v
                p = probs(q, k, v)
                x = self.finish(attention, x, p.to(v.dtype) @ v) if self.attend is None else self.attend(attention, x, p, v)
            else:
                x = _step(block, name, x)
        return x

    def run_mlp(self, block: nn.Module, x: Tensor) -> Tensor:
        for name in self.mlp:
            x = _step(block, name, x)
        return x


def _attr(module: nn.Module, path: str):
    """The attribute at dotted ``path`` below ``module``."""
    for name in path.split("."):
        module = getattr(module, name)
    return module


def _step(block: nn.Module, name: str, x: Tensor) -> Tensor:
    part = _attr(block, name)
    if part is None:
        return x
    if isinstance(part, Tensor):  # a layer scale kept as a bare parameter
        return x * part
    return part(x)


@loadable
class ReducingBlock:
    """Mixed in front of a block class: the reduction hook point sits between its two branches."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        patch: Patch = getattr(self, ATTR)
        layer: int = self._tokenreduce_layer
        layout: BlockLayout = self._tokenreduce_layout
        if getattr(self, "gradient_checkpointing", False) and self.training:
            # Hugging Face layers re-run forward in backward; the token state has moved on by then.
            raise TypeError("gradient checkpointing cannot be combined with token reduction; tokenreduce.remove(model) first")
        kwargs.update(zip(layout.params, args))
        mask = kwargs.pop(layout.mask_kwarg, None) if layout.mask_kwarg else None
        tables = {name: kwargs.pop(name) for name in layout.token_kwargs if kwargs.get(name) is not None}
        state = patch.begin(x, masked=mask is not None or bool(kwargs.get("is_causal"))) if layer == 0 else patch.current()
        hook, scale = patch.method.hook, layout.scale_of(getattr(self, layout.attention))
        state.block_input = x
        if hook is Hook.START:
            # projected only where the block reduces: elsewhere the method has nothing to decide
            project = patch.method.start_qkv and state.schedule[layer] != x.shape[1]
            qkv = layout.project_input(self, x, state.follow_tokens(tables)) if project else None
            x = patch.reduce(state, layer, x, scale, patch.attn_bias(state, x.dtype), hook, qkv)
        tables = state.follow_tokens(tables)
        bias = patch.attn_bias(state, x.dtype)
        if patch.method.edits_attention:
            probs = lambda q, k, v: patch.attend(state, layer, q, k, v, scale, bias)  # noqa: E731
            x = x + layout.run_attn_edited(self, x, probs, tables, state)
        else:
            x = x + layout.run_attn(self, x, mask if bias is None else bias, {**kwargs, **tables}, state)
        if hook is Hook.ATTN:
            x = patch.reduce(state, layer, x, scale, bias, hook)
        x = x + layout.run_mlp(self, x)
        if hook is Hook.END:
            x = patch.reduce(state, layer, x, scale, bias, hook)
        return x


def _structure(block: nn.Module) -> tuple:
    """The classes of a block and all its submodules: blocks alike in this run the same code."""
    return tuple((name, type(m)) for name, m in block.named_modules())


def _materialized(block: nn.Module) -> nn.Module:
    """A CPU copy of a meta-device block with random weights, to check its code without its weights."""
    if any(not b.is_floating_point() for b in block.buffers()):
        raise TypeError(
            f"{type(block).__qualname__} has integer buffers, which a meta-device model does not hold; "
            "materialise the model (model.to_empty(device=...) and load the weights) before tokenreduce.apply"
        )
    block = copy.deepcopy(block).to_empty(device="cpu").float()
    gen = torch.Generator().manual_seed(0)
    for t in [*block.parameters(), *block.buffers()]:
        t.copy_(torch.randn(t.shape, generator=gen) * 0.5)
    return block


@torch.no_grad()
def verify_layout(block: nn.Module, layout: BlockLayout, width: int, example: Callable[[nn.Module], dict] | None = None) -> None:
    """Raise unless the layout reproduces the block's own forward on a random ``[2, 7, width]`` input
    (and the keyword arguments ``example(block)`` gives for 7 tokens, such as a rotary table)."""
    if next(block.parameters()).is_meta:
        block = _materialized(block)
    param = next(block.parameters())
    x = torch.randn(2, 7, width, generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
    tables = {} if example is None else example(block)
    training = block.training
    block.eval()
    try:
        no_mask = {layout.mask_kwarg: None} if layout.mask_kwarg else {}
        expected = type(block).forward(block, x, **no_mask, **tables)
        y = x + layout.run_attn(block, x, None, tables)
        got = y + layout.run_mlp(block, y)
        scale = layout.scale_of(getattr(block, layout.attention))
        softmax = lambda q, k, v: ((q @ k.transpose(-1, -2)) * scale).softmax(-1)  # noqa: E731
        edited = x + layout.run_attn_edited(block, x, softmax, tables)
    finally:
        block.train(training)
    tol = 1e-4 if expected.dtype == torch.float32 else 3e-2
    atol = tol * expected.float().abs().max().item()
    if not torch.allclose(got.float(), expected.float(), rtol=tol, atol=atol):
        raise TypeError(
            f"{type(block).__qualname__}.forward does not match the layout tokenreduce expects "
            f"(attention branch {layout.attn}, MLP branch {layout.mlp}); this library version changed the block"
        )
    if not torch.allclose(edited.float(), y.float(), rtol=tol, atol=atol):
        raise TypeError(
            f"{type(getattr(block, layout.attention)).__qualname__} does not compute attention the way tokenreduce "
            f"projects and finishes it ({layout.project.__name__}, {(layout.attend or layout.finish).__name__}); "
            "this library version changed it"
        )


def install_blocks(
    patch: Patch,
    blocks: Sequence[nn.Module],
    layouts: Sequence[BlockLayout],
    width: int,
    example: Callable[[nn.Module], dict] | None = None,
) -> None:
    """Check every block against its layout (once per distinct structure; ``example`` as in
    :func:`verify_layout`), then patch them all: a reduction hook point between the branches, and
    queries/keys captured for the method (where tokenreduce runs the attention itself, it keeps them)."""
    verified = set()
    for block, layout in zip(blocks, layouts):
        structure = _structure(block)
        if structure not in verified:
            verify_layout(block, layout, width, example)
            verified.add(structure)
    for i, (block, layout) in enumerate(zip(blocks, layouts)):
        patch.set_attr(block, ATTR, patch)
        patch.set_attr(block, "_tokenreduce_layer", i)
        patch.set_attr(block, "_tokenreduce_layout", layout)
        if not layout.runs_attention:
            heads = int(_attr(getattr(block, layout.attention), layout.heads))
            patch.capture_qk(
                block.get_submodule(layout.query), block.get_submodule(layout.key), heads if layout.split_heads else None
            )
            patch.capture(block.get_submodule(layout.value), "v", heads, chunk=layout.value_chunk)
        patch.swap_class(block, ReducingBlock)


def _heads(t: Tensor, head_dim: int) -> Tensor:
    return t.unflatten(-1, (-1, head_dim)).transpose(1, 2)


@loadable
def timm_qkv(attn: nn.Module, x: Tensor) -> QKV:
    """timm ``Attention``: one fused ``qkv`` projection, then qk-norm on queries and keys."""
    q, k, v = attn.qkv(x).unflatten(-1, (3, attn.num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


@loadable
def separate_qkv(attn: nn.Module, x: Tensor) -> QKV:
    """Hugging Face attention: separate ``q_proj``, ``k_proj``, ``v_proj``, split into heads."""
    return tuple(_heads(proj(x), attn.head_dim) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))  # type: ignore[return-value]


def _merge_heads(probs: Tensor, v: Tensor) -> Tensor:
    return (probs.to(v.dtype) @ v).transpose(1, 2).flatten(2)


@loadable
def timm_finish(attn: nn.Module, x: Tensor, heads: Tensor) -> Tensor:
    """timm ``Attention`` (and EVA's) from the heads' outputs ``[B, H, N, D]``: heads merged, output
    norm, optional gate, projection."""
    out = attn.norm(heads.transpose(1, 2).flatten(2))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


@loadable
def timm_attend(attn: nn.Module, x: Tensor, probs: Tensor, v: Tensor) -> Tensor:
    """timm ``Attention`` after its softmax: :func:`timm_finish` of ``probs @ v``."""
    return timm_finish(attn, x, probs.to(v.dtype) @ v)


@loadable
def separate_attend(attn: nn.Module, x: Tensor, probs: Tensor, v: Tensor) -> Tensor:
    """Hugging Face attention after its softmax: heads merged, output projection (``out_proj``/``o_proj``)."""
    proj = attn.out_proj if hasattr(attn, "out_proj") else attn.o_proj
    return proj(_merge_heads(probs, v))


def linear_macs(module: nn.Module) -> int:
    """Multiply-accumulates per token of every ``nn.Linear`` inside ``module``."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))
