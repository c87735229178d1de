"""Hugging Face vision towers (transformers 5.x): ``CLIPVisionModel`` (also the image tower of
``CLIPModel`` and of LLaVA), ``SiglipVisionModel``, ``Dinov2Model`` and ``ViTModel``.

Facts relied on (transformers 5.24): each tower runs a ``ModuleList`` of pre-norm layers, each a
norm, an attention module called as ``attention(hidden_states, attention_mask=..., **kwargs)`` that
returns ``(output, weights)`` and projects queries and keys with ``q_proj`` / ``k_proj``, optional
layer scale and dropout, a residual add, then the same around the MLP. The layouts below are checked
against each layer's own forward when patching. The proportional-attention bias reaches the attention
as its additive ``attention_mask``, which eager and SDPA attention accept (flash attention does not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from tokenreduce.adapters.base import Adapter, BlockCost, class_names
from tokenreduce.adapters.blocks import BlockLayout, install_blocks, linear_macs, separate_attend, separate_qkv
from tokenreduce.patch import ATTR, Patch, original_class
from tokenreduce.registry import loadable, register_adapter


def _layout(attn: tuple[str, ...], mlp: tuple[str, ...], attention: str, scale: str, heads: str) -> BlockLayout:
    return BlockLayout(
        attn=attn,
        mlp=mlp,
        attention=attention,
        mask_kwarg="attention_mask",
        params=("attention_mask",),
        query=f"{attention}.q_proj",
        key=f"{attention}.k_proj",
        split_heads=True,
        scale=scale,
        heads=heads,
        value=f"{attention}.v_proj",
        value_chunk=None,
        project=separate_qkv,
        attend=separate_attend,
    )


@dataclass(frozen=True)
class Tower:
    """Where one tower family keeps its layers, and how a layer is laid out."""

    blocks: str  # attribute path of the layer list
    layer: str  # qualified class name of a layer
    layout: BlockLayout
    class_token: bool
    attention_pool: str | None = None  # the nn.MultiheadAttention of an attention-pooling head, if any
    query: str | None = None  # the query projection in a layer, where the layout captures none (FLOP model)


_CLIP_LIKE = _layout(("layer_norm1", "self_attn"), ("layer_norm2", "mlp"), "self_attn", "scale", "num_heads")
VIT_LIKE = _layout(
    ("layernorm_before", "attention", "dropout"),
    ("layernorm_after", "mlp", "dropout"),
    "attention",
    "scaling",
    "num_attention_heads",
)
TOWERS = {
    "transformers.models.clip.modeling_clip.CLIPVisionModel": Tower(
        "encoder.layers", "transformers.models.clip.modeling_clip.CLIPEncoderLayer", _CLIP_LIKE, True
    ),
    "transformers.models.siglip.modeling_siglip.SiglipVisionModel": Tower(
        "encoder.layers", "transformers.models.siglip.modeling_siglip.SiglipEncoderLayer", _CLIP_LIKE, False, "head.attention"
    ),
    "transformers.models.dinov2.modeling_dinov2.Dinov2Model": Tower(
        "encoder.layer",
        "transformers.models.dinov2.modeling_dinov2.Dinov2Layer",
        _layout(
            ("norm1", "attention", "layer_scale1", "drop_path"),
            ("norm2", "mlp", "layer_scale2", "drop_path"),
            "attention",
            "scaling",
            "num_attention_heads",
        ),
        True,
    ),
    "transformers.models.vit.modeling_vit.ViTModel": Tower(
        "layers", "transformers.models.vit.modeling_vit.ViTLayer", VIT_LIKE, True
    ),
}


@loadable
class PaddingMaskedPool:
    """Mixed in front of a tower's attention-pooling ``nn.MultiheadAttention`` under a method with
    per-image counts: the padding tokens (size 0) are masked as keys, so padded rows pool as alone."""

    def forward(self, query, key, value, key_padding_mask=None, *args, **kwargs):
        state = getattr(self, ATTR).latest()
        size = None if state is None else state.size
        if key_padding_mask is None and size is not None and size.shape[:2] == key.shape[:2]:
            key_padding_mask = size[..., 0] == 0
        return super().forward(query, key, value, key_padding_mask, *args, **kwargs)  # type: ignore[misc]


@register_adapter
class HFVisionTower(Adapter):
    name = "hf-vision"
    family = "Hugging Face vision towers (CLIPVisionModel and CLIPModel's image tower, SiglipVisionModel, Dinov2Model, ViTModel)"

    towers: ClassVar[dict[str, Tower]] = TOWERS

    @classmethod
    def _tower(cls, model: nn.Module) -> Tower | None:
        return next((cls.towers[n] for n in class_names(model) if n in cls.towers), None)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return cls._tower(model) is not None

    def _spec(self, model: nn.Module) -> Tower:
        tower = self._tower(model)
        assert tower is not None
        return tower

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return int(self._spec(model).class_token)

    def has_cls_token(self, model: nn.Module) -> bool:
        return self._spec(model).class_token

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.get_submodule(self._spec(model).blocks))

    def default_num_tokens(self, model: nn.Module) -> int | None:
        config = model.config
        side = lambda v: v if isinstance(v, int) else v[0]  # noqa: E731
        per_side = side(config.image_size) // side(config.patch_size)
        return per_side * per_side + self.num_prefix_tokens(model)

    def install(self, model: nn.Module, patch: Patch) -> None:
        spec = self._spec(model)
        blocks = self.blocks(model)
        if not blocks:
            raise TypeError(f"{type(model).__name__} has no layers to patch ({spec.blocks} is empty)")
        if getattr(model, "is_activation_checkpointing", False):
            raise TypeError(
                "gradient checkpointing re-runs layers after the token state has moved on; "
                "call model.gradient_checkpointing_disable() before tokenreduce.apply"
            )
        for i, block in enumerate(blocks):
            if spec.layer not in class_names(block):
                raise TypeError(f"layer {i} is a {type(block).__qualname__}; {type(model).__name__} layers must be {spec.layer}")
        if getattr(patch.method, "needs_image", False):
            convs = embedding_convs(model)
            if len(convs) != 1:
                raise TypeError(f"{type(model).__name__}.embeddings has {len(convs)} convolutions; one patch embedding expected")
            patch.capture_image(convs[0])
        install_blocks(patch, blocks, [spec.layout] * len(blocks), width=model.config.hidden_size)
        if getattr(patch.method, "variable_counts", False) and spec.attention_pool and _has_module(model, spec.attention_pool):
            pool = model.get_submodule(spec.attention_pool)
            patch.set_attr(pool, ATTR, patch)
            patch.swap_class(pool, PaddingMaskedPool)

    def block_costs(self, model: nn.Module) -> list[BlockCost]:
        spec = self._spec(model)
        layout = spec.layout
        return [
            BlockCost(
                attn_macs_per_token=linear_macs(getattr(block, layout.attention)),
                attn_dim=block.get_submodule(spec.query or layout.query).out_features,
                mlp_macs_per_token=sum(linear_macs(block.get_submodule(name)) for name in layout.mlp),
            )
            for block in self.blocks(model)
        ]

    def stem_head_macs(self, model: nn.Module, num_tokens: int) -> int:
        return sum(c.weight.numel() for c in embedding_convs(model)) * (num_tokens - self.num_prefix_tokens(model))

    def summary(self, model: nn.Module) -> str:
        blocks = self.blocks(model)
        kinds = sorted({original_class(b).__name__ for b in blocks})
        layout = self._spec(model).layout
        attention = "scaled-dot-product, run by tokenreduce" if layout.runs_attention else model.config._attn_implementation
        return (
            f"{original_class(model).__name__}: {len(blocks)} layers ({', '.join(kinds)}), "
            f"{self.num_prefix_tokens(model)} prefix tokens, attention {attention}"
        )


def embedding_convs(model: nn.Module) -> list[nn.Module]:
    """The convolutions of the model's embeddings: its patch (or a video's tubelet) embedding."""
    return [m for m in model.embeddings.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True
