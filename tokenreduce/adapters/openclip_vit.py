"""open_clip ``VisionTransformer``: the image tower (``model.visual``) of open_clip's CLIP and CoCa models.

Facts relied on (open_clip_torch 3.x, ``open_clip.transformer``): ``VisionTransformer.forward`` embeds the
patches behind one class token (``_embeds``; training-time patch dropout keeps it first), runs
``transformer.resblocks`` batch-first as ``block(x, attn_mask=None)``, then pools (``_pool``: class token
``'tok'``, mean of the patch tokens ``'avg'``, all tokens ``'none'``, or an ``AttentionalPooler`` first, CoCa)
and projects with ``proj``; with ``output_tokens`` it also returns the patch tokens. A block is
``ResidualAttentionBlock`` (``ln_1``, ``nn.MultiheadAttention`` ``attn``, layer scale ``ls_1``, then
``ln_2``, ``mlp``, ``ls_2``) or ``CustomResidualAttentionBlock`` (open_clip's own ``Attention``, with
``ln_attn`` after it).

Both attentions project queries, keys and values with one fused ``in_proj_weight`` inside their call, so
no submodule's output holds them: tokenreduce runs these attentions itself (``in_proj_qkv``,
scaled-dot-product attention, ``mha_finish`` / ``attention_finish``), checked against each block's own
forward when patching. Scaled cosine attention (``scaled_cosine_attn``) is refused.

After reduction: ``'avg'`` pooling weights each token by its size; an ``AttentionalPooler`` attends over the
reduced tokens, weighted by size (``log(size)`` in its attention mask) under a method with proportional
attention; ``output_tokens`` returns the reduced patch tokens (:func:`tokenreduce.record` says which patches
each covers; ``Record.restore`` spreads them back); ``forward_intermediates(output_fmt='NCHW')`` gives full
patch grids (:meth:`~tokenreduce.state.Record.patch_grid`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from tokenreduce.adapters.base import Adapter, BlockCost, class_names, nlc_intermediates
from tokenreduce.adapters.blocks import QKV, BlockLayout, install_blocks, linear_macs
from tokenreduce.core import size_weighted_mean
from tokenreduce.patch import ATTR, Patch, original_class
from tokenreduce.registry import loadable, register_adapter

VIT = "open_clip.transformer.VisionTransformer"
MHA = "torch.nn.modules.activation.MultiheadAttention"


@loadable
def in_proj_qkv(attn: nn.Module, x: Tensor) -> QKV:
    """``(q, k, v)`` ``[B, H, N, D]`` of a fused ``in_proj_weight`` (``nn.MultiheadAttention``, open_clip's
    ``Attention``, whose optional qk-norm ``ln_q``/``ln_k`` follows)."""
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).unflatten(-1, (3, attn.num_heads, -1)).permute(2, 0, 3, 1, 4)
    if hasattr(attn, "ln_q"):
        q, k = attn.ln_q(q), attn.ln_k(k)
    return q, k, v


@loadable
def mha_finish(attn: nn.Module, x: Tensor, heads: Tensor) -> Tensor:
    """``nn.MultiheadAttention`` from the heads' outputs ``[B, H, N, D]``: heads merged, ``out_proj``."""
    return attn.out_proj(heads.transpose(1, 2).flatten(2))


@loadable
def mha_scale(attn: nn.Module) -> float:
    return attn.head_dim**-0.5


@loadable
def attention_finish(attn: nn.Module, x: Tensor, heads: Tensor) -> Tensor:
    """open_clip ``Attention`` from the heads' outputs: head scale, heads merged, inner norm, projection."""
    if attn.head_scale is not None:
        heads = heads * attn.head_scale
    return attn.out_drop(attn.out_proj(attn.ln_inner(heads.transpose(1, 2).flatten(2))))


_RUN = dict(attention="attn", mask_kwarg="attn_mask", query=None, key=None, value=None, split_heads=False, value_chunk=None)
_RUN.update(heads="num_heads", project=in_proj_qkv)
LAYOUTS = {
    "open_clip.transformer.ResidualAttentionBlock": BlockLayout(
        attn=("ln_1", "attn", "ls_1"),
        mlp=("ln_2", "mlp", "ls_2"),
        params=("k_x", "v_x", "attn_mask"),
        scale=mha_scale,
        finish=mha_finish,
        dropout="dropout",
        **_RUN,
    ),
    "open_clip.transformer.CustomResidualAttentionBlock": BlockLayout(
        attn=("ln_1", "attn", "ln_attn", "ls_1"),
        mlp=("ln_2", "mlp", "ls_2"),
        params=("attn_mask",),
        scale="scale",
        finish=attention_finish,
        dropout="attn_drop",
        **_RUN,
    ),
}


@loadable
class ReducingOpenCLIPVisionTransformer:
    """Mixed in front of open_clip's ``VisionTransformer``: size-weighted ``'avg'`` pooling, full patch grids
    from ``forward_intermediates``."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise TypeError("gradient checkpointing cannot be combined with token reduction; tokenreduce.remove(model) first")
        super().set_grad_checkpointing(False)  # type: ignore[misc]

    def _pool(self, x: Tensor) -> tuple[Tensor, Tensor]:
        state = getattr(self, ATTR).latest()
        size = None if state is None else state.size
        if self.attn_pool is not None or self.pool_type != "avg" or size is None or size.shape[:2] != x.shape[:2]:
            return super()._pool(x)  # type: ignore[misc]
        if not self.final_ln_after_pool:
            x = self.ln_post(x)
        pooled, tokens = size_weighted_mean(x[:, 1:], size[:, 1:]), x[:, 1:]
        return (self.ln_post(pooled) if self.final_ln_after_pool else pooled), tokens

    def forward_intermediates(self, x: Tensor, *args, **kwargs) -> dict:
        # open_clip reshapes NCHW intermediates with reshape(B, H, W, -1), which fewer tokens cannot fill:
        # run NLC, then spread each intermediate back over the patch grid.
        bound, out, spread = nlc_intermediates(super().forward_intermediates, x, args, kwargs)  # type: ignore[misc]
        if not spread:
            return out
        from open_clip.utils import feature_take_indices

        take, _ = feature_take_indices(len(self.transformer.resblocks), bound.arguments["indices"])
        grid = (x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1])
        record = getattr(self, ATTR).latest().record()
        out["image_intermediates"] = [record.patch_grid(y, i, grid) for y, i in zip(out["image_intermediates"], take)]
        return out


@loadable
class SizedCrossAttention:
    """Mixed in front of the ``nn.MultiheadAttention`` of an ``AttentionalPooler`` over the image tokens: with
    proportional attention, its attention to each token is weighted by the token's size."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *args, **kwargs):
        if not args and kwargs.get("attn_mask") is None:
            bias = getattr(self, ATTR).pool_bias(key)
            if bias is not None:  # [B, 1, 1, S] -> [B * heads, L, S], the mask layout MultiheadAttention takes
                b, length, s = key.shape[0], query.shape[1], key.shape[1]
                kwargs["attn_mask"] = bias.expand(b, self.num_heads, length, s).reshape(b * self.num_heads, length, s)
        return super().forward(query, key, value, *args, **kwargs)  # type: ignore[misc]


def _check_attention(i: int, attn: nn.Module) -> None:
    if MHA in class_names(attn):
        bad = {
            "kdim/vdim other than embed_dim": not attn._qkv_same_embed_dim,
            "bias_k/bias_v": attn.bias_k is not None,
            "add_zero_attn": attn.add_zero_attn,
            "batch_first=False": not attn.batch_first,
        }
    else:
        bad = {"scaled cosine attention": attn.logit_scale is not None, "attention without SDPA": not attn.use_fsdpa}
    unsupported = [k for k, v in bad.items() if v]
    if unsupported:
        raise TypeError(f"block {i} attention {type(attn).__qualname__} uses {unsupported}, which tokenreduce does not support")


@register_adapter
class OpenCLIPViT(Adapter):
    name = "open-clip-vit"
    family = "open_clip VisionTransformer (the image tower model.visual of open_clip CLIP and CoCa models)"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return VIT in class_names(model)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 1  # open_clip's vision tower always has its class token first

    def has_cls_token(self, model: nn.Module) -> bool:
        return True

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.transformer.resblocks)

    def default_num_tokens(self, model: nn.Module) -> int | None:
        return model.grid_size[0] * model.grid_size[1] + 1

    def install(self, model: nn.Module, patch: Patch) -> None:
        blocks = self.blocks(model)
        if not blocks:
            raise TypeError(f"{type(model).__name__} has no transformer blocks to patch (transformer.resblocks is empty)")
        if model.transformer.grad_checkpointing:
            raise TypeError(
                "gradient checkpointing re-runs blocks after the token state has moved on; "
                "call model.set_grad_checkpointing(False) before tokenreduce.apply"
            )
        if not model.transformer.batch_first:
            raise TypeError("a transformer run sequence-first (batch_first=False) is not supported")
        layouts = []
        for i, block in enumerate(blocks):
            layout = next((LAYOUTS[n] for n in class_names(block) if n in LAYOUTS), None)
            if layout is None:
                raise TypeError(f"block {i} is a {type(block).__qualname__}; supported block classes: {sorted(LAYOUTS)}")
            _check_attention(i, block.attn)
            layouts.append(layout)
        if getattr(patch.method, "needs_image", False):
            patch.capture_image(model.conv1)
        install_blocks(patch, blocks, layouts, width=model.transformer.width)
        poolers = [model.attn_pool] if model.attn_pool is not None else []
        if getattr(model, "attn_pool_contrastive", None) is not None and model.attn_pool_type == "parallel":
            poolers.append(model.attn_pool_contrastive)  # 'cascade' pools the first pooler's outputs, not tokens
        for pooler in poolers:
            patch.set_attr(pooler.attn, ATTR, patch)
            patch.swap_class(pooler.attn, SizedCrossAttention)
        patch.swap_class(model, ReducingOpenCLIPVisionTransformer)

    def block_costs(self, model: nn.Module) -> list[BlockCost]:
        return [
            BlockCost(
                attn_macs_per_token=block.attn.in_proj_weight.numel() + linear_macs(block.attn),
                attn_dim=block.attn.in_proj_weight.shape[0] // 3,
                mlp_macs_per_token=linear_macs(block.mlp),
            )
            for block in self.blocks(model)
        ]

    def stem_head_macs(self, model: nn.Module, num_tokens: int) -> int:
        stem = model.conv1.weight.numel() * (num_tokens - 1)
        return stem + (0 if model.proj is None else model.proj.numel())

    def summary(self, model: nn.Module) -> str:
        blocks = self.blocks(model)
        kinds = sorted({original_class(b).__name__ for b in blocks})
        pool = "attentional pooler" if model.attn_pool is not None else f"pool_type={model.pool_type!r}"
        return f"{original_class(model).__name__}: {len(blocks)} blocks ({', '.join(kinds)}), 1 prefix token, {pool}"
