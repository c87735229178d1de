"""timm ``VisionTransformer`` (ViT, DeiT incl. distilled, DINOv2, register tokens, qk-norm, CLIP and SigLIP
towers), also inside timm's ``features_only`` wrappers.

Attention pooling (``global_pool='map'``, timm's ``AttentionPoolLatent``, SigLIP's head) attends over the
reduced tokens; under a method with proportional attention its attention is weighted by token size as the
blocks' is (``log(size)`` added to the logits through the pool's ``attn_mask``), so at sizes 1 it is the
pool's own. ``forward_intermediates(output_fmt='NCHW')``, which timm's ``features_only`` wrapper
(``FeatureGetterNet``) calls, gives full patch grids (:meth:`~tokenreduce.state.Record.patch_grid`).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from tokenreduce.adapters.base import Adapter, BlockCost, class_names, nlc_intermediates
from tokenreduce.adapters.blocks import BlockLayout, install_blocks, linear_macs, timm_attend, timm_qkv
from tokenreduce.core import size_weighted_mean
from tokenreduce.patch import ATTR, Patch, original_class
from tokenreduce.registry import loadable, register_adapter

VIT = "timm.models.vision_transformer.VisionTransformer"
SUPPORTED_POOLS = ("", "token", "avg", "avgmax", "max", "map")
ATTENTION_POOL = "timm.layers.attention_pool.AttentionPoolLatent"

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


@loadable
class ReducingVisionTransformer:
    """Mixed in front of ``VisionTransformer`` (and EVA's ``Eva``): average pooling weighted by token size,
    max pooling over the tokens of nonzero size, full patch grids from ``forward_intermediates``."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise TypeError("gradient checkpointing cannot be combined with token reduction; tokenreduce.remove(model) first")
        super().set_grad_checkpointing(False)  # type: ignore[misc]

    def forward_intermediates(self, x: Tensor, *args, **kwargs):
        # timm reshapes NCHW intermediates with reshape(B, H, W, -1), which fewer tokens cannot fill:
        # run NLC, then spread each intermediate back over the patch grid (Record.restore: every
        # reduction up to that block undone, dropped patches from the nearest covered one).
        bound, out, spread = nlc_intermediates(super().forward_intermediates, x, args, kwargs)  # type: ignore[misc]
        if not spread:
            return out
        from timm.models._features import feature_take_indices

        take, _ = feature_take_indices(len(self.blocks), bound.arguments["indices"])
        grid = self.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
        record = getattr(self, ATTR).latest().record()

        def convert(items: list) -> list:  # items are tensors, or (tensor, prefix tokens) pairs
            return [
                (record.patch_grid(y[0], i, grid), y[1]) if isinstance(y, tuple) else record.patch_grid(y, i, grid)
                for y, i in zip(items, take)
            ]

        if bound.arguments.get("output_dict"):
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
        if (
            size is None
            or pool_type not in ("avg", "avgmax", "max")
            or size.shape[:2] != x.shape[:2]
            or self.attn_pool is not None
        ):
            return super().pool(x, pool_type)  # type: ignore[misc]
        start = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens  # EVA has no such option
        tokens, weight = x[:, start:], size[:, start:]
        # Padding (size 0: rows of a method with per-image counts) never wins the max.
        peak = None if pool_type == "avg" else tokens.masked_fill(weight == 0, float("-inf")).amax(dim=1)
        if pool_type == "max":
            return peak
        avg = size_weighted_mean(tokens, weight)
        return avg if pool_type == "avg" else 0.5 * (peak + avg)


@loadable
class SizedAttentionPool:
    """Mixed in front of timm's ``AttentionPoolLatent``: with proportional attention, its attention to each
    token is weighted by the token's size, as the blocks' attention is."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        if attn_mask is None:
            attn_mask = getattr(self, ATTR).pool_bias(x)
        return super().forward(x, attn_mask=attn_mask)  # type: ignore[misc]


@register_adapter
class TimmViT(Adapter):
    name = "timm-vit"
    family = "timm VisionTransformer and its subclasses (vit_*, deit_*, DINOv2, CLIP and SigLIP image towers, features_only)"
    layouts: ClassVar[dict[str, BlockLayout]] = LAYOUTS
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

    def layout(self, i: int, block: nn.Module) -> BlockLayout:
        """Block ``i``'s layout; a ``TypeError`` for a block or attention this adapter does not know."""
        layout = next((self.layouts[n] for n in class_names(block) if n in self.layouts), None)
        if layout is None:
            raise TypeError(f"block {i} is a {type(block).__qualname__}; supported block classes: {sorted(self.layouts)}")
        missing = [a for a in self.attn_requires if not hasattr(block.attn, a)]
        if missing:
            raise TypeError(f"block {i} attention {type(block.attn).__qualname__} lacks {missing}")
        return layout

    def example(self, model: nn.Module):
        """Keyword arguments beside the tokens for checking a block's layout (see ``verify_layout``)."""
        return None

    def install(self, model: nn.Module, patch: Patch) -> None:
        blocks = self.blocks(model)
        if not blocks:
            raise TypeError(f"{type(model).__name__} has no transformer blocks to patch (model.blocks is empty)")
        if getattr(model, "grad_checkpointing", False):
            raise TypeError(
                "gradient checkpointing re-runs blocks after the token state has moved on; "
                "call model.set_grad_checkpointing(False) before tokenreduce.apply"
            )
        pool = model.attn_pool
        if pool is not None and ATTENTION_POOL not in class_names(pool):
            raise TypeError(
                f"global_pool={model.global_pool!r} ({type(pool).__name__}) is not supported; "
                f"supported global_pool values: {SUPPORTED_POOLS}"
            )
        layouts = [self.layout(i, block) for i, block in enumerate(blocks)]
        if getattr(patch.method, "needs_image", False):
            # timm's PatchEmbed convolves the (optionally padded) image; a hybrid stem's proj sees CNN features instead.
            if "timm.layers.patch_embed.PatchEmbed" not in class_names(model.patch_embed):
                raise TypeError(
                    f"method {patch.method.name!r} reads the pixels of each patch, which {type(model.patch_embed).__name__} "
                    "(not timm's PatchEmbed) does not convolve directly"
                )
            patch.capture_image(model.patch_embed.proj)
        install_blocks(patch, blocks, layouts, width=model.embed_dim, example=self.example(model))
        if pool is not None:
            patch.set_attr(pool, ATTR, patch)
            patch.swap_class(pool, SizedAttentionPool)
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
