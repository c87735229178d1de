"""timm ``VisionTransformer`` (ViT, DeiT incl. distilled, DINOv2, register tokens, qk-norm, CLIP towers)."""

from __future__ import annotations

import inspect
from typing import ClassVar

import torch
from torch import Tensor, nn

from tokenreduce.adapters.base import Adapter, BlockCost, class_names
from tokenreduce.adapters.blocks import BlockLayout, install_blocks, linear_macs, timm_attend, timm_qkv
from tokenreduce.patch import ATTR, Patch, original_class
from tokenreduce.registry import loadable, register_adapter

VIT = "timm.models.vision_transformer.VisionTransformer"
SUPPORTED_POOLS = ("", "token", "avg", "avgmax", "max")

# timm attention: q/k after qk-norm are [B, H, N, D] (Identity norms when qk_norm is off).
_TIMM = dict(
    attention="attn",
    mask_kwarg="attn_mask",
    params=("attn_mask", "is_causal"),
    query="attn.q_norm",
    key="attn.k_norm",
    split_heads=False,
    scale="scale",
    heads="num_heads",
    value="attn.qkv",
    value_chunk=(2, 3),
    project=timm_qkv,
    attend=timm_attend,
)
LAYOUTS = {
    "timm.models.vision_transformer.Block": BlockLayout(
        attn=("norm1", "attn", "ls1", "drop_path1"), mlp=("norm2", "mlp", "ls2", "drop_path2"), **_TIMM
    ),
    "timm.models.vision_transformer.ResPostBlock": BlockLayout(
        attn=("attn", "norm1", "drop_path1"), mlp=("mlp", "norm2", "drop_path2"), **_TIMM
    ),
}


def _layout(block: nn.Module) -> BlockLayout | None:
    return next((LAYOUTS[n] for n in class_names(block) if n in LAYOUTS), None)


@loadable
class ReducingVisionTransformer:
    """Mixed in front of ``VisionTransformer``: average pooling weighted by token size, max pooling
    over the tokens of nonzero size."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise TypeError("gradient checkpointing cannot be combined with token reduction; tokenreduce.remove(model) first")
        super().set_grad_checkpointing(False)  # type: ignore[misc]

    def forward_intermediates(self, x: Tensor, *args, **kwargs):
        # timm reshapes NCHW intermediates with reshape(B, H, W, -1), which fewer tokens cannot fill:
        # run NLC, then spread each intermediate back over the patch grid (Record.restore: every
        # reduction up to that block undone, dropped patches from the nearest covered one).
        bound = inspect.signature(super().forward_intermediates).bind(x, *args, **kwargs)  # type: ignore[misc]
        bound.apply_defaults()
        if bound.arguments["output_fmt"] != "NCHW":
            return super().forward_intermediates(*bound.args, **bound.kwargs)  # type: ignore[misc]
        bound.arguments["output_fmt"] = "NLC"
        out = super().forward_intermediates(*bound.args, **bound.kwargs)  # type: ignore[misc]
        from timm.models._features import feature_take_indices

        take, _ = feature_take_indices(len(self.blocks), bound.arguments["indices"])
        grid = self.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
        record, p = getattr(self, ATTR).latest().record(), self.num_prefix_tokens

        def spread(tokens: Tensor, block: int) -> Tensor:
            # timm hands over the patch tokens only; the prefix tokens are never reduced, so zeros stand in.
            full = torch.cat([tokens.new_zeros(tokens.shape[0], p, tokens.shape[-1]), tokens], dim=1)
            restored = record.restore(full, block, grid)[:, p:]
            return restored.reshape(tokens.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous()

        def convert(items: list) -> list:  # items are tensors, or (tensor, prefix tokens) pairs
            return [(spread(y[0], i), y[1]) if isinstance(y, tuple) else spread(y, i) for y, i in zip(items, take)]

        if bound.arguments["output_dict"]:
            out["image_intermediates"] = convert(out["image_intermediates"])
            return out
        if bound.arguments["intermediates_only"]:
            return convert(out)
        final, intermediates = out
        return final, convert(intermediates)

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        state = getattr(self, ATTR).latest()
        size = None if state is None else state.size
        if size is None or pool_type not in ("avg", "avgmax", "max") or size.shape[:2] != x.shape[:2]:
            return super().pool(x, pool_type)  # type: ignore[misc]
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        tokens, weight = x[:, start:], size[:, start:].to(x.dtype)
        # Padding (size 0: rows of a method with per-image counts) never wins the max.
        peak = None if pool_type == "avg" else tokens.masked_fill(weight == 0, float("-inf")).amax(dim=1)
        if pool_type == "max":
            return peak
        avg = (tokens * weight).sum(dim=1) / weight.sum(dim=1)
        return avg if pool_type == "avg" else 0.5 * (peak + avg)


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
        layouts = []
        for i, block in enumerate(blocks):
            layout = _layout(block)
            if layout is None:
                raise TypeError(f"block {i} is a {type(block).__qualname__}; supported block classes: {sorted(LAYOUTS)}")
            missing = [a for a in self.attn_requires if not hasattr(block.attn, a)]
            if missing:
                raise TypeError(f"block {i} attention {type(block.attn).__qualname__} lacks {missing}")
            layouts.append(layout)
        install_blocks(patch, blocks, layouts, width=blocks[0].attn.qkv.in_features)
        patch.swap_class(model, ReducingVisionTransformer)

    def block_costs(self, model: nn.Module) -> list[BlockCost]:
        return [
            BlockCost(
                attn_macs_per_token=linear_macs(block.attn),
                attn_dim=block.attn.num_heads * block.attn.head_dim,
                mlp_macs_per_token=linear_macs(block.mlp),
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
