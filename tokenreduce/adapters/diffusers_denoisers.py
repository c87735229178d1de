"""diffusers denoisers: ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL), ``UNetMotionModel`` (AnimateDiff,
spatial blocks), ``DiTTransformer2DModel``, ``PixArtTransformer2DModel``, ``SD3Transformer2DModel`` and
``FluxTransformer2DModel``; a pipeline holding one of them is patched through it.

A denoiser's blocks must give back every token (the next convolution, un-patchify or residual needs the
full grid), so reduction happens inside a block: the block's class is swapped for one that asks the
method for a selection of its input image tokens, and each wrapped sub-module (self-attention, and
optionally cross-attention and the MLP) merges its input and spreads its output back over all tokens
inside the residual branch. Nothing of a block's own forward is copied: gates, norms (``ada_norm_zero``,
``ada_norm_single`` without ``norm3``, ``ada_norm_continuous``) and positional embeddings run as
diffusers wrote them. Every argument is found by name or by its place in the signature, so keyword
calls and gradient checkpointing's positional calls both work.

Facts relied on (diffusers 0.42.1): ``BasicTransformerBlock`` calls ``attn1(norm_hidden_states, ...)``,
``attn2`` and ``ff`` the same way; ``JointTransformerBlock`` calls ``attn(hidden_states=image,
encoder_hidden_states=text)`` returning ``(image, text)`` and, with dual attention, ``attn2(
hidden_states=image)``; ``FluxTransformerBlock`` likewise with ``image_rotary_emb = (cos, sin)`` rows
for ``[text; image]``; ``FluxSingleTransformerBlock`` concatenates ``[text; image]`` itself before
``attn(hidden_states=..., image_rotary_emb=...)``. UNet attention runs on the latent grid downsampled
by 2 per down block; DiT, PixArt and SD3 on the latent cut into ``patch_size`` patches; FLUX on packed
tokens whose ``img_ids`` columns 1 and 2 hold each token's row and column.

A method that recomputes only some tokens per step (:class:`~tokenreduce.methods.denoiser.Recompute`,
CAT Pruning) keeps every token in every sub-module and reuses the others' outputs from the last step:
its blocks run here and their wrapped sub-modules call :mod:`tokenreduce.adapters.denoiser_recompute`.
"""

from __future__ import annotations

import importlib
import inspect
import math
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from tokenreduce.adapters.base import Adapter, BlockCost, class_names
from tokenreduce.adapters.denoiser_recompute import attention_problem, recomputed
from tokenreduce.core import Selection
from tokenreduce.methods.base import Method
from tokenreduce.methods.denoiser import DenoiserContext, DenoiserMethod, Part, Recompute
from tokenreduce.patch import ATTR, Patch, original_class
from tokenreduce.registry import loadable, register_adapter
from tokenreduce.stages import Stage

BLOCK_ATTR = "_tokenreduce_block"
ROLE_ATTR = "_tokenreduce_role"
ARGS_ATTR = "_tokenreduce_args"


class Role(str, Enum):
    """How a wrapped sub-module receives the image tokens."""

    TOKENS = "tokens"  # its first argument is the image tokens, its output one tensor of them
    KV = "kv"  # self-attention whose keys and values come from the selection (ToDo); queries stay full
    JOINT = "joint"  # hidden_states are the image tokens, encoder_hidden_states the text; returns (image, text)
    PREFIX = "prefix"  # hidden_states are [text; image]; returns one tensor in that order


@dataclass(frozen=True)
class Wrapped:
    attr: str
    part: Part
    role: Role


@dataclass(frozen=True)
class BlockKind:
    """Which sub-modules of a block class hold image tokens, as data."""

    name: str
    modules: tuple[Wrapped, ...]
    text_prefix: bool = False  # FLUX single: the text length comes from the block's encoder_hidden_states


BLOCK_KINDS = {
    kind.name: kind
    for kind in (
        BlockKind(
            "BasicTransformerBlock",
            (
                Wrapped("attn1", Part.ATTN, Role.TOKENS),
                Wrapped("attn2", Part.CROSS_ATTN, Role.TOKENS),
                Wrapped("ff", Part.MLP, Role.TOKENS),
            ),
        ),
        BlockKind(
            "JointTransformerBlock",
            (
                Wrapped("attn", Part.ATTN, Role.JOINT),
                Wrapped("attn2", Part.ATTN, Role.TOKENS),
                Wrapped("ff", Part.MLP, Role.TOKENS),
            ),
        ),
        BlockKind("FluxTransformerBlock", (Wrapped("attn", Part.ATTN, Role.JOINT), Wrapped("ff", Part.MLP, Role.TOKENS))),
        BlockKind("FluxSingleTransformerBlock", (Wrapped("attn", Part.ATTN, Role.PREFIX),), text_prefix=True),
    )
}
# Blocks inside these run along time (AnimateDiff motion modules): their sequences are frames, not a grid.
TEMPORAL = ("TransformerTemporalModel", "AnimateDiffTransformer3D", "TransformerSpatioTemporalModel")


class GridFrom(str, Enum):
    LATENT = "latent"  # the latent's H x W is the finest token grid (UNets)
    PATCHES = "patches"  # the latent cut into config.patch_size patches (DiT, PixArt, SD3)
    IDS = "ids"  # packed tokens with img_ids rows and columns (FLUX)


@dataclass(frozen=True)
class DenoiserSpec:
    latent: str  # the argument holding the latent (or packed tokens)
    grid: GridFrom


SPECS = {
    "diffusers.models.unets.unet_2d_condition.UNet2DConditionModel": DenoiserSpec("sample", GridFrom.LATENT),
    "diffusers.models.unets.unet_motion_model.UNetMotionModel": DenoiserSpec("sample", GridFrom.LATENT),
    "diffusers.models.transformers.dit_transformer_2d.DiTTransformer2DModel": DenoiserSpec("hidden_states", GridFrom.PATCHES),
    "diffusers.models.transformers.pixart_transformer_2d.PixArtTransformer2DModel": DenoiserSpec(
        "hidden_states", GridFrom.PATCHES
    ),
    "diffusers.models.transformers.transformer_sd3.SD3Transformer2DModel": DenoiserSpec("hidden_states", GridFrom.PATCHES),
    "diffusers.models.transformers.transformer_flux.FluxTransformer2DModel": DenoiserSpec("hidden_states", GridFrom.IDS),
}


@dataclass(frozen=True)
class Installed:
    """What a patched denoiser's forward needs, found once when patching: where its forward takes the
    arguments the engine reads (name and position, for positional calls), how its finest token grid
    follows from the latent, and its token block count."""

    latent: tuple[str, int]
    timestep: tuple[str, int]
    img_ids: tuple[str, int] | None
    grid: GridFrom
    patch_size: int
    depth: int


def _place(signature: inspect.Signature, name: str) -> tuple[str, int]:
    return name, list(signature.parameters).index(name)


def _arg(args: tuple, kwargs: dict, place: tuple[str, int]) -> Any:
    name, index = place
    return args[index] if len(args) > index else kwargs.get(name)


@dataclass(frozen=True)
class BlockCall:
    """One block that reduced in a call: its index and level, and its image tokens before and after
    (for a method that shrinks keys and values only, ``tokens_out`` counts the keys and values; for one
    that recomputes chosen tokens, the tokens recomputed)."""

    block: int
    level: int
    tokens_in: int
    tokens_out: int


@dataclass(frozen=True)
class DenoiserRecord:
    """What one denoiser call did (:func:`tokenreduce.record`): the finest token grid, the step in the
    generation when the method counts steps, and every block that reduced (none when the method left
    this call alone: it did nothing, and says so)."""

    grid: tuple[int, int]
    step: int | None
    calls: tuple[BlockCall, ...]  # with a Recompute plan: tokens_out is the count of tokens computed

    @property
    def reduced_blocks(self) -> int:
        return len(self.calls)


@dataclass
class Generation:
    """Per thread, across the calls of one generation: the last timestep, the step index, the method's memory."""

    timestep: float
    step: int
    memory: Any


@dataclass
class DenoiserRun:
    """The state of one denoiser call, private to the calling thread."""

    grid: tuple[int, int]
    timestep: Tensor | None
    step: int | None
    memory: Any
    depth: int
    selection: Selection | None = None  # the running block's
    recompute: Recompute | None = None  # the running block's, for a method that recomputes chosen tokens
    text_len: int = 0  # the running FLUX single block's text tokens
    calls: list[BlockCall] = field(default_factory=list)

    def record(self) -> DenoiserRecord:
        return DenoiserRecord(self.grid, self.step, tuple(self.calls))


def _patch(module: nn.Module) -> Patch | None:
    return module.__dict__.get(ATTR)


def _swap(patch: Patch, module: nn.Module, mixin: type, path: str) -> None:
    """Swap ``module``'s class for one with ``mixin`` in front, inside any diffusers hooks on it.

    diffusers hooks (``enable_cache``: FirstBlockCache, TaylorSeer, ...) replace ``module.forward`` on
    the instance and call the forward they found then, so a class swap alone would be bypassed: the
    innermost forward of their chain is pointed at the patched class too (and back on removal), which
    keeps the reduction inside the cached module, so caches always see every token."""
    base = type(module)
    patch.swap_class(module, mixin)
    _share_registrations(base, type(module))
    own = module.__dict__.get("forward")
    if own is None:
        return
    patched = types.MethodType(type(module).forward, module)
    if getattr(own, "__self__", None) is module and getattr(own, "__func__", None) is base.forward:
        patch.replace_attr(module, "forward", patched)  # what a removed diffusers hook leaves behind
        return
    registry = module.__dict__.get("_diffusers_hook")
    refs = getattr(registry, "_fn_refs", None)
    if not refs:
        raise TypeError(
            f"{path or type(module).__name__} has its forward replaced on the instance ({module.__dict__['forward']!r}), "
            "which tokenreduce cannot run inside; apply tokenreduce before wrapping the model"
        )
    inner = "original_forward" if refs[0].original_forward is not None else "forward"
    patch.replace_attr(refs[0], inner, patched)


def _run(patch: Patch) -> DenoiserRun:
    run = getattr(patch.local, "run", None)
    if run is None:
        raise RuntimeError("a patched denoiser block ran outside the denoiser's forward: call the patched model itself")
    return run


def _share_registrations(base: type, patched: type) -> None:
    """diffusers' hooks look blocks and attention modules up in registries keyed by exact class
    (``TransformerBlockRegistry``, ``AttentionProcessorRegistry``): a patched class gets its base's
    entry, so ``enable_cache`` still works on a patched model. The entry keeps the base class, whose
    signature the hooks read."""
    try:
        helpers = importlib.import_module("diffusers.hooks._helpers")
    except ImportError:
        return
    for name in ("TransformerBlockRegistry", "AttentionProcessorRegistry"):
        registry = getattr(helpers, name, None)
        table = getattr(registry, "_registry", None)
        if table is None:
            continue
        registry._register()
        if base in table:
            table.setdefault(patched, table[base])


@loadable
class DenoisingModel:
    """Mixed in front of the denoiser: opens each call's state (grid, timestep, step) for its blocks."""

    def forward(self, *args, **kwargs):
        patch = _patch(self)
        if patch is None:  # removed, but called through a wrapper that kept this forward
            return type(self).forward(self, *args, **kwargs)
        run = _open_run(self, patch, args, kwargs)
        patch.local.run = run
        out = super().forward(*args, **kwargs)  # type: ignore[misc]
        method = patch.method
        if method.uses_steps:
            sample = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
            replaced = method.observe(sample, _context(run, -1, 1, run.grid))
            if replaced is not None:
                out = _with_sample(out, replaced)
        return out


def _with_sample(out: Any, sample: Tensor) -> Any:
    """The denoiser's output (a tensor, a tuple or a diffusers ``Transformer2DModelOutput``) with its
    sample replaced."""
    if isinstance(out, tuple):
        return (sample, *out[1:])
    if isinstance(out, Tensor):
        return sample
    out.sample = sample  # a ModelOutput: sets the attribute and the key
    return out


def _open_run(model: nn.Module, patch: Patch, args: tuple, kwargs: dict) -> DenoiserRun:
    info: Installed = getattr(model, ARGS_ATTR)
    latent = _arg(args, kwargs, info.latent)
    timestep = _arg(args, kwargs, info.timestep)
    if not isinstance(latent, Tensor):
        raise TypeError(f"the patched {type(model).__name__} needs its {info.latent[0]!r} tensor argument")
    if info.grid is GridFrom.IDS:
        grid = _grid_from_ids(_arg(args, kwargs, info.img_ids), latent.shape[-2])
    else:
        grid = (latent.shape[-2] // info.patch_size, latent.shape[-1] // info.patch_size)
    timestep = torch.as_tensor(timestep) if timestep is not None and not isinstance(timestep, Tensor) else timestep
    step, memory = None, None
    method: DenoiserMethod = patch.method  # type: ignore[assignment]
    if method.uses_steps:
        step, memory = _advance(patch, method, timestep)
    return DenoiserRun(grid, timestep, step, memory, info.depth)


def _advance(patch: Patch, method: DenoiserMethod, timestep: Tensor | None) -> tuple[int, Any]:
    """The step index of this call and the generation's memory: a call at the timestep of the last one
    is the same step (the other CFG branch); a lower one the next step; a higher one (or the first call
    in this thread) starts a new generation. Counting by value, not by calls, keeps split CFG right."""
    if timestep is None:
        raise TypeError(f"method {method.name!r} follows the denoising steps and needs the denoiser's timestep argument")
    t = float(timestep.detach().flatten()[0])
    gen: Generation | None = getattr(patch.local, "generation", None)
    if gen is None or t > gen.timestep:
        gen = Generation(t, 0, method.new_memory())
        patch.local.generation = gen
    elif t < gen.timestep:
        gen.step += 1
        gen.timestep = t
    return gen.step, gen.memory


def _grid_from_ids(ids: Tensor | None, num_tokens: int) -> tuple[int, int]:
    if not isinstance(ids, Tensor):
        raise TypeError("FluxTransformer2DModel needs img_ids (rows and columns of the packed tokens) for token reduction")
    ids = ids[0] if ids.dim() == 3 else ids
    rows = int(ids[:, 1].max() - ids[:, 1].min()) + 1
    cols = int(ids[:, 2].max() - ids[:, 2].min()) + 1
    if rows * cols != num_tokens:
        raise ValueError(
            f"img_ids describe a {rows}x{cols} grid but there are {num_tokens} image tokens; token reduction needs "
            "one grid of image tokens (conditioning images appended to the sequence are not supported)"
        )
    return rows, cols


def _context(run: DenoiserRun, block: int, level: int, grid: tuple[int, int]) -> DenoiserContext:
    return DenoiserContext(block, run.depth, level, grid, run.timestep, run.step, run.memory)


@loadable
class ReducingBlock:
    """Mixed in front of a token block: asks the method for this call's selection of the block's image
    tokens, which the block's wrapped sub-modules then apply."""

    def forward(self, *args, **kwargs):
        patch = _patch(self)
        if patch is None:
            return type(self).forward(self, *args, **kwargs)
        run = _run(patch)
        index, level, kind = getattr(self, BLOCK_ATTR)
        x = args[0] if args else kwargs["hidden_states"]
        h, w = run.grid
        grid = (math.ceil(h / level), math.ceil(w / level))
        if grid[0] * grid[1] != x.shape[1]:
            raise RuntimeError(
                f"block {index} of the patched denoiser got {x.shape[1]} image tokens, which is not the {grid[0]}x{grid[1]} "
                f"grid of its level (the latent grid {h}x{w} downsampled {level}x)"
            )
        selection = patch.method.plan(x, _context(run, index, level, grid))
        if selection is None:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        if isinstance(selection, Recompute):
            if selection.index is not None:
                run.calls.append(BlockCall(index, level, x.shape[1], selection.index.shape[1]))
            run.recompute = selection
            try:
                return super().forward(*args, **kwargs)  # type: ignore[misc]
            finally:
                run.recompute = None
        if kind.text_prefix:
            text = args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]
            run.text_len = text.shape[1]
        run.selection = selection
        if not run.calls or run.calls[-1].block < index:  # gradient checkpointing reruns blocks in backward
            run.calls.append(BlockCall(index, level, x.shape[1], selection.num_out))
        try:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        finally:
            run.selection = None


@loadable
class MergedModule:
    """Mixed in front of a wrapped sub-module: runs it on the selected tokens, spreads its output back."""

    def forward(self, *args, **kwargs):
        patch = _patch(self)
        if patch is None:
            return type(self).forward(self, *args, **kwargs)
        run = _run(patch)
        if run.recompute is not None:
            args, kwargs, x = _take_hidden(args, kwargs)
            joint = getattr(self, ROLE_ATTR) is Role.JOINT
            text = _encoder_states(args, kwargs)
            return recomputed(self, super().forward, run.recompute, x, args, kwargs, text=text, joint=joint)  # type: ignore[misc]
        selection = run.selection
        if selection is None:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        role = getattr(self, ROLE_ATTR)
        args, kwargs, x = _take_hidden(args, kwargs)
        if role is Role.KV:
            # The block passes its self-attention encoder_hidden_states=None (by name, or next after the
            # hidden states): the selected tokens take that place.
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            if mask is not None:
                raise ValueError(
                    f"method {patch.method.name!r} shrinks the keys of this self-attention, and it was given an "
                    "attention_mask over all of them, which cannot follow; call the denoiser without one"
                )
            kv = selection.apply(x)
            args, kwargs = ((kv, *args[1:]), kwargs) if args else (args, {**kwargs, "encoder_hidden_states": kv})
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        if role is Role.TOKENS:
            return selection.unmerge(super().forward(selection.apply(x), *args, **kwargs))  # type: ignore[misc]
        text_len = run.text_len if role is Role.PREFIX else _text_len(args, kwargs)
        rotary = kwargs.get("image_rotary_emb")
        if rotary is None or selection.index.shape[0] == 1:
            return self._tokenreduce_merged(selection, x, text_len, role, args, kwargs)
        # The rotary table has one row per token and no batch dimension, and each image keeps other
        # tokens: such a call runs image by image.
        rows = [
            self._tokenreduce_merged(selection.row(b), x[b : b + 1], text_len, role, *_row_args(args, kwargs, b, x.shape[0]))
            for b in range(x.shape[0])
        ]
        return _cat_rows(rows)

    def _tokenreduce_merged(self, selection: Selection, x: Tensor, text_len: int, role: Role, args: tuple, kwargs: dict):
        if kwargs.get("image_rotary_emb") is not None:
            kwargs = {**kwargs, "image_rotary_emb": _rotary_rows(kwargs["image_rotary_emb"], selection, text_len)}
        if role is Role.JOINT:
            out = super().forward(selection.apply(x), *args, **kwargs)  # type: ignore[misc]
            if isinstance(out, tuple):
                return (selection.unmerge(out[0]), *out[1:])
            return selection.unmerge(out)
        merged = torch.cat([x[:, :text_len], selection.apply(x[:, text_len:])], dim=1)
        out = super().forward(merged, *args, **kwargs)  # type: ignore[misc]
        return torch.cat([out[:, :text_len], selection.unmerge(out[:, text_len:])], dim=1)


def _take_hidden(args: tuple, kwargs: dict) -> tuple[tuple, dict, Tensor]:
    if args:
        return args[1:], kwargs, args[0]
    kwargs = dict(kwargs)
    return args, kwargs, kwargs.pop("hidden_states")


def _encoder_states(args: tuple, kwargs: dict) -> Tensor | None:
    """A wrapped sub-module's ``encoder_hidden_states`` (the text), its hidden states taken out."""
    return args[0] if args else kwargs.get("encoder_hidden_states")


def _text_len(args: tuple, kwargs: dict) -> int:
    text = _encoder_states(args, kwargs)
    return 0 if text is None else text.shape[1]


def _rotary_rows(rotary: tuple[Tensor, Tensor], selection: Selection, text_len: int) -> tuple[Tensor, ...]:
    """The rotary rows of ``[text; kept image tokens]``: each output token takes the position of the
    token it inherits (:attr:`Selection.index`, the destination of a merge)."""
    keep = torch.cat([torch.arange(text_len, device=selection.index.device), text_len + selection.index[0]])
    return tuple(t[keep] for t in rotary)


def _row_args(args: tuple, kwargs: dict, b: int, batch: int) -> tuple[tuple, dict]:
    def cut(value):
        return value[b : b + 1] if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch else value

    return tuple(cut(a) for a in args), {k: v if k == "image_rotary_emb" else cut(v) for k, v in kwargs.items()}


def _cat_rows(rows: list) -> Any:
    if isinstance(rows[0], tuple):
        return tuple(torch.cat(parts, dim=0) if parts[0] is not None else None for parts in zip(*rows))
    return torch.cat(rows, dim=0)


def _spec_name(model: nn.Module) -> str:
    return next(name for name in class_names(model) if name in SPECS)


@dataclass(frozen=True)
class TokenBlock:
    path: str
    module: nn.Module
    kind: BlockKind
    level: int


def _walk(module: nn.Module, path: str, level: int, out: list[TokenBlock], temporal: list[str]) -> None:
    name = original_class(module).__name__
    if name in TEMPORAL:
        temporal.append(path)
        return
    kind = BLOCK_KINDS.get(name)
    if kind is not None:
        out.append(TokenBlock(path, module, kind, level))
        return
    for child_name, child in module.named_children():
        _walk(child, f"{path}.{child_name}" if path else child_name, level, out, temporal)


def _scan(model: nn.Module) -> tuple[list[TokenBlock], list[str]]:
    """The token blocks in forward order with their downsampling level, and the temporal parts skipped.
    A UNet's level doubles after each down block with a downsampler and halves after each up block
    with an upsampler; every other denoiser runs all blocks on one grid."""
    blocks: list[TokenBlock] = []
    temporal: list[str] = []
    if not hasattr(model, "down_blocks"):
        _walk(model, "", 1, blocks, temporal)
        return blocks, temporal
    level = 1
    for i, block in enumerate(model.down_blocks):
        _walk(block, f"down_blocks.{i}", level, blocks, temporal)
        if getattr(block, "downsamplers", None):
            level *= 2
    if model.mid_block is not None:
        _walk(model.mid_block, "mid_block", level, blocks, temporal)
    for i, block in enumerate(model.up_blocks):
        _walk(block, f"up_blocks.{i}", level, blocks, temporal)
        if getattr(block, "upsamplers", None):
            level //= 2
    return blocks, temporal


def _blocks_of(model: nn.Module) -> list[TokenBlock]:
    return _scan(model)[0]


def _recompute_problem(model: nn.Module, blocks: list[TokenBlock], method: DenoiserMethod) -> str | None:
    """Why a method that recomputes chosen tokens cannot run on ``model``, or ``None``: the denoiser's
    output must be its patch grid (a DiT, PixArt or SD3: the method reuses outputs per token) and every
    wrapped self-attention must be one
    :func:`~tokenreduce.adapters.denoiser_recompute.attention_problem` lets it compute."""
    if SPECS[_spec_name(model)].grid is not GridFrom.PATCHES:
        supported = [name.rsplit(".", 1)[1] for name, spec in SPECS.items() if spec.grid is GridFrom.PATCHES]
        return f"it runs on denoisers whose output is their token grid ({', '.join(supported)}), not {type(model).__name__}"
    for block in blocks:
        for w in block.kind.modules:
            module = getattr(block.module, w.attr, None)
            if module is None or w.part not in method.parts():
                continue
            cross = w.part is not Part.ATTN or getattr(block.module, "only_cross_attention", False)
            problem = attention_problem(module) if w.role is Role.JOINT or not cross else None
            if problem is not None:
                return f"{block.path}.{w.attr}: {problem}"
    return None


def _acting(model: nn.Module, method: DenoiserMethod) -> list[TokenBlock]:
    return [b for b in _blocks_of(model) if method.acts_at(b.level)]


def _wrapped(block: TokenBlock, method: DenoiserMethod) -> Iterator[tuple[nn.Module, Role]]:
    parts = method.parts()
    for w in block.kind.modules:
        module = getattr(block.module, w.attr, None)
        if module is None or w.part not in parts:
            continue
        role = w.role
        if method.kv_only:
            if w.part is not Part.ATTN or role is not Role.TOKENS or getattr(block.module, "only_cross_attention", False):
                continue
            role = Role.KV
        yield module, role


def _wraps_any(block: TokenBlock, method: DenoiserMethod) -> bool:
    return next(_wrapped(block, method), None) is not None


@register_adapter
class DiffusersDenoiserAdapter(Adapter):
    name = "diffusers_denoiser"
    family = (
        "diffusers UNet2DConditionModel, UNetMotionModel, DiTTransformer2DModel, PixArtTransformer2DModel, "
        "SD3Transformer2DModel, FluxTransformer2DModel (or a pipeline holding one)"
    )
    stages = (Stage.DENOISER,)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return any(name in SPECS for name in class_names(model))

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 0

    def has_cls_token(self, model: nn.Module) -> bool:
        return False

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [b.module for b in _blocks_of(model)]

    def default_num_tokens(self, model: nn.Module) -> int | None:
        return None  # the latent size is the caller's choice

    def block_costs(self, model: nn.Module) -> list[BlockCost]:
        return []  # denoiser FLOPs are counted by torch's FlopCounterMode in the bench, not modelled per block

    def stem_head_macs(self, model: nn.Module, num_tokens: int) -> int:
        return 0

    def summary(self, model: nn.Module) -> str:
        blocks, temporal = _scan(model)
        levels = sorted({b.level for b in blocks})
        text = f"{original_class(model).__name__}: {len(blocks)} token blocks at downsampling levels {levels}"
        return text + (f"; {len(temporal)} temporal transformers left alone" if temporal else "")

    def validate(self, model: nn.Module, method: Method) -> None:
        assert isinstance(method, DenoiserMethod)
        blocks, _ = _scan(model)
        if not blocks:
            raise TypeError(
                f"{type(model).__name__} has no token block tokenreduce knows of ({', '.join(BLOCK_KINDS)}): nothing to reduce"
            )
        acting = [b for b in blocks if method.acts_at(b.level)]
        if not acting:
            levels = sorted({b.level for b in blocks})
            raise ValueError(
                f"method {method} reduces no block of {type(model).__name__}: its attention runs at downsampling levels "
                f"{levels}; raise max_downsample to at least {levels[0]}"
            )
        if method.recomputes:
            problem = _recompute_problem(model, acting, method)
            if problem is not None:
                raise TypeError(f"method {method.name!r} recomputes chosen tokens and reuses the rest across steps: {problem}")
        bare = [b for b in acting if not _wraps_any(b, method)]
        if method.kv_only and bare:
            kinds = sorted({b.kind.name for b in bare})
            raise TypeError(
                f"method {method.name!r} shrinks the keys and values of a plain self-attention; {', '.join(kinds)} "
                "blocks have joint text-image attention, which it cannot shrink"
            )
        if len(bare) == len(acting):
            raise TypeError(
                f"method {method} wraps {sorted(map(str, method.parts()))}, which no block of {type(model).__name__} has"
            )

    def install(self, model: nn.Module, patch: Patch) -> None:
        method: DenoiserMethod = patch.method  # type: ignore[assignment]
        signature = inspect.signature(type(model).forward)
        names = list(signature.parameters)[1:]  # without self
        sig = inspect.Signature([signature.parameters[n] for n in names])
        spec = SPECS[_spec_name(model)]
        blocks = _blocks_of(model)
        info = Installed(
            _place(sig, spec.latent),
            _place(sig, "timestep"),
            _place(sig, "img_ids") if spec.grid is GridFrom.IDS else None,
            spec.grid,
            model.config.patch_size if spec.grid is GridFrom.PATCHES else 1,
            len(blocks),
        )
        patch.set_attr(model, ARGS_ATTR, info)
        _swap(patch, model, DenoisingModel, "")
        for index, block in enumerate(blocks):
            if not method.acts_at(block.level):
                continue
            wrapped = list(_wrapped(block, method))
            if not wrapped:
                continue
            patch.set_attr(block.module, ATTR, patch)
            patch.set_attr(block.module, BLOCK_ATTR, (index, block.level, block.kind))
            _swap(patch, block.module, ReducingBlock, block.path)
            for module, role in wrapped:
                patch.set_attr(module, ATTR, patch)
                patch.set_attr(module, ROLE_ATTR, role)
                _swap(patch, module, MergedModule, block.path)

    def plan(self, model: nn.Module, method: Method) -> list[str]:
        assert isinstance(method, DenoiserMethod)
        blocks = _blocks_of(model)
        acting = [b for b in _acting(model, method) if _wraps_any(b, method)]
        levels = sorted({b.level for b in acting})
        parts = "keys and values of self-attention" if method.kv_only else ", ".join(sorted(map(str, method.parts())))
        if method.recomputes:
            return [f"recomputes chosen tokens in {len(acting)} of {len(blocks)} token blocks, the rest cached: {parts}"]
        return [f"reduces {len(acting)} of {len(blocks)} token blocks (downsampling levels {levels}) around: {parts}"]

    def record(self, patch: Patch) -> DenoiserRecord | None:
        run = getattr(patch.local, "run", None)
        return None if run is None else run.record()
