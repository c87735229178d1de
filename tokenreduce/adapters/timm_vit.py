"""timm ``VisionTransformer`` (ViT, DeiT incl. distilled, DINOv2, register tokens, qk-norm, CLIP towers).

Blocks are not re-implemented: the patched forward calls the block's own submodules in the order
its ``BlockLayout`` names, and that order is checked against the block's original forward when
patching, so a timm change that the layout misses raises instead of computing something else.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from tokenreduce.adapters.base import Adapter, BlockCost, class_names
from tokenreduce.patch import ATTR, Patch, original_class
from tokenreduce.registry import loadable, register_adapter

VIT = "timm.models.vision_transformer.VisionTransformer"
SUPPORTED_POOLS = ("", "token", "avg", "avgmax", "max")


@loadable
@dataclass(frozen=True)
class BlockLayout:
    """Residual branches of a block as submodule names, applied in order; ``attn`` takes the mask."""

    attn: tuple[str, ...]
    mlp: tuple[str, ...]

    @staticmethod
    def run(block: nn.Module, names: tuple[str, ...], x: Tensor, **attn_kwargs) -> Tensor:
        for name in names:
            x = getattr(block, name)(x, **attn_kwargs) if name == "attn" else getattr(block, name)(x)
        return x


LAYOUTS = {
    "timm.models.vision_transformer.Block": BlockLayout(
        attn=("norm1", "attn", "ls1", "drop_path1"), mlp=("norm2", "mlp", "ls2", "drop_path2")
    ),
    "timm.models.vision_transformer.ResPostBlock": BlockLayout(
        attn=("attn", "norm1", "drop_path1"), mlp=("mlp", "norm2", "drop_path2")
    ),
}


def _layout(block: nn.Module) -> BlockLayout | None:
    return next((LAYOUTS[n] for n in class_names(block) if n in LAYOUTS), None)


@loadable
class ReducingBlock:
    """Mixed in front of a timm block class: the reduction hook point sits between the branches."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        patch: Patch = getattr(self, ATTR)
        layer: int = self._tokenreduce_layer
        layout: BlockLayout = self._tokenreduce_layout
        state = patch.begin(x, masked=attn_mask is not None or is_causal) if layer == 0 else patch.current()
        bias = patch.attn_bias(state, x.dtype)
        mask = attn_mask if bias is None else bias
        x = x + layout.run(self, layout.attn, x, attn_mask=mask, is_causal=is_causal)
        x = patch.reduce(state, layer, x, self.attn.scale, bias)
        return x + layout.run(self, layout.mlp, x)


@loadable
class ReducingVisionTransformer:
    """Mixed in front of ``VisionTransformer``: average pooling weighted by token size."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise TypeError("gradient checkpointing cannot be combined with token reduction; tokenreduce.remove(model) first")
        super().set_grad_checkpointing(False)  # type: ignore[misc]

    def forward_intermediates(self, x: Tensor, *args, **kwargs):
        # timm reshapes NCHW intermediates with reshape(B, H, W, -1): fewer tokens would silently
        # come back as a wrong channel count instead of failing.
        bound = inspect.signature(super().forward_intermediates).bind(x, *args, **kwargs)  # type: ignore[misc]
        bound.apply_defaults()
        if bound.arguments["output_fmt"] == "NCHW":
            h, w = self.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
            patch: Patch = getattr(self, ATTR)
            n0 = h * w + self.num_prefix_tokens
            if patch.method.schedule(n0, patch.num_prefix, patch.depth)[-1] != n0:
                raise ValueError(
                    "forward_intermediates(output_fmt='NCHW') needs every patch token in a grid; "
                    "use output_fmt='NLC' with token reduction"
                )
        return super().forward_intermediates(*bound.args, **bound.kwargs)  # type: ignore[misc]

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        state = getattr(self, ATTR).latest()
        size = None if state is None else state.size
        if size is None or pool_type not in ("avg", "avgmax") or size.shape[:2] != x.shape[:2]:
            return super().pool(x, pool_type)  # type: ignore[misc]
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        tokens, weight = x[:, start:], size[:, start:].to(x.dtype)
        avg = (tokens * weight).sum(dim=1) / weight.sum(dim=1)
        return avg if pool_type == "avg" else 0.5 * (tokens.amax(dim=1) + avg)


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
def _verify_layout(block: nn.Module, layout: BlockLayout) -> None:
    """Raise unless the layout reproduces the block's own forward on a random input."""
    if next(block.parameters()).is_meta:
        block = _materialized(block)
    param = next(block.parameters())
    x = torch.randn(2, 7, block.attn.qkv.in_features, generator=torch.Generator().manual_seed(0))
    x = x.to(param.device, param.dtype)
    training = block.training
    block.eval()
    try:
        expected = type(block).forward(block, x)
        y = x + layout.run(block, layout.attn, x, attn_mask=None)
        got = y + layout.run(block, layout.mlp, y)
    finally:
        block.train(training)
    tol = 1e-4 if expected.dtype == torch.float32 else 3e-2
    if not torch.allclose(got.float(), expected.float(), rtol=tol, atol=tol * expected.float().abs().max().item()):
        raise TypeError(
            f"{type(block).__qualname__}.forward does not match the layout tokenreduce expects "
            f"(attn branch {layout.attn}, mlp branch {layout.mlp}); this timm version changed the block"
        )


@register_adapter
class TimmViT(Adapter):
    name = "timm-vit"
    family = "timm VisionTransformer and its subclasses (vit_*, deit_*, DINOv2, CLIP image towers)"
    attn_requires: ClassVar[tuple[str, ...]] = ("qkv", "q_norm", "k_norm", "scale", "num_heads")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return VIT in class_names(model)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return int(model.num_prefix_tokens)

    def has_cls_token(self, model: nn.Module) -> bool:
        return bool(model.has_class_token)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def default_num_tokens(self, model: nn.Module) -> int | None:
        if getattr(model, "dynamic_img_size", False):
            return None
        return int(model.patch_embed.num_patches) + self.num_prefix_tokens(model)

    def install(self, model: nn.Module, patch: Patch) -> None:
        blocks = self.blocks(model)
        if not blocks:
            raise TypeError(f"{type(model).__name__} has no transformer blocks to patch (model.blocks is empty)")
        if getattr(model, "grad_checkpointing", False):
            raise TypeError(
                "gradient checkpointing re-runs blocks after the token state has moved on; "
                "call model.set_grad_checkpointing(False) before tokenreduce.apply"
            )
        if model.attn_pool is not None:
            raise TypeError(
                f"global_pool={model.global_pool!r} (attention pooling) is not supported; "
                f"supported global_pool values: {SUPPORTED_POOLS}"
            )
        layouts, verified = [], set()
        for i, block in enumerate(blocks):
            layout = _layout(block)
            if layout is None:
                raise TypeError(f"block {i} is a {type(block).__qualname__}; supported block classes: {sorted(LAYOUTS)}")
            missing = [a for a in self.attn_requires if not hasattr(block.attn, a)]
            if missing:
                raise TypeError(f"block {i} attention {type(block.attn).__qualname__} lacks {missing}")
            structure = _structure(block)
            if structure not in verified:
                _verify_layout(block, layout)
                verified.add(structure)
            layouts.append(layout)
        for i, (block, layout) in enumerate(zip(blocks, layouts)):
            patch.set_attr(block, ATTR, patch)
            patch.set_attr(block, "_tokenreduce_layer", i)
            patch.set_attr(block, "_tokenreduce_layout", layout)
            patch.capture_qk(block.attn.q_norm, block.attn.k_norm)
            patch.swap_class(block, ReducingBlock)
        patch.set_attr(model, ATTR, patch)
        patch.swap_class(model, ReducingVisionTransformer)

    def block_costs(self, model: nn.Module) -> list[BlockCost]:
        return [
            BlockCost(
                attn_macs_per_token=_linear_macs(block.attn),
                attn_dim=block.attn.num_heads * block.attn.head_dim,
                mlp_macs_per_token=_linear_macs(block.mlp),
            )
            for block in self.blocks(model)
        ]

    def stem_head_macs(self, model: nn.Module, num_tokens: int) -> int:
        num_patches = num_tokens - self.num_prefix_tokens(model)
        proj = model.patch_embed.proj
        stem = proj.weight.numel() * num_patches if isinstance(proj, nn.Conv2d) else 0
        head = model.head.weight.numel() if isinstance(model.head, nn.Linear) else 0
        return stem + head

    def summary(self, model: nn.Module) -> str:
        blocks = self.blocks(model)
        fused = all(getattr(b.attn, "fused_attn", False) for b in blocks)
        kinds = sorted({original_class(b).__name__ for b in blocks})
        return (
            f"{original_class(model).__name__}: "
            f"{len(blocks)} blocks ({', '.join(kinds)}), {self.num_prefix_tokens(model)} prefix tokens, "
            f"global_pool={model.global_pool!r}, attention {'fused (SDPA)' if fused else 'eager'}"
        )


def _linear_macs(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))
