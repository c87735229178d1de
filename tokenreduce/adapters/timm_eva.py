"""timm ``Eva``: EVA-01 and EVA-02 (``eva_*``, ``eva02_*``), the rotary ViTs (``vit_*_rope_*``), Perception
Encoder (``vit_pe_*``) and DINOv3 (``vit_*_dinov3*``), also inside timm's ``features_only`` wrappers.

Facts relied on (timm 1.0.x, ``timm.models.eva``): ``Eva.forward_features`` runs ``model.blocks``, passing
each block ``rope=`` (the rotary table of the patch tokens: ``[N - P, 2 D]`` for the ``cat`` and ``dinov3``
kinds, ``[H, N - P, 2 D]`` per block for ``mixed``, with a batch dimension in front after training-time
patch dropout), ``attn_mask=`` and ``is_causal=``. A block is ``EvaBlock`` (pre-norm; layer scales are bare
parameters ``gamma_1`` / ``gamma_2`` or ``None``) or ``EvaBlockPostNorm``; its attention is ``EvaAttention``
or timm's ``AttentionRope``: queries, keys and values from one fused ``qkv`` (EVA keeps the query and value
biases apart and has no key bias) or from ``q_proj``/``k_proj``/``v_proj`` (grouped keys and values repeated
per head), qk-norm, then the rotary embedding on the tokens after ``num_prefix_tokens``, then the same
output path as timm's ``Attention`` (output norm, optional gate, projection).

The rotation happens after the attention's last submodule, so no module output holds the queries and keys
the softmax sees: tokenreduce runs this attention itself (``eva_qkv``, scaled-dot-product attention,
``timm_finish``), checked against each block's own forward, with a random rotary table, when patching.
Methods see the queries and keys after the rotation, as the attention's softmax does.

Rotary embeddings follow the tokens (``BlockLayout.token_kwargs``): the engine keeps, for each token, the
original token whose position it holds (``ForwardState.position``, every step's ``Selection.index``
followed: the kept token; for a merge, its destination), and hands each block the rows of its rotary table
at those positions, ``[B, 1 or H, N - P, 2 D]``, which EVA's rotation broadcasts over the heads as it does
its own table after patch dropout. A merged token is therefore rotated as the token whose position it
inherits; a fused or pooled token as its ``index`` token.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenreduce.adapters.base import class_names
from tokenreduce.adapters.blocks import QKV, BlockLayout, timm_finish
from tokenreduce.adapters.timm_vit import TimmViT
from tokenreduce.patch import Patch
from tokenreduce.registry import loadable, register_adapter

EVA = "timm.models.eva.Eva"
ATTENTIONS = ("timm.models.eva.EvaAttention", "timm.layers.attention.AttentionRope")


def _rotate(x: Tensor, table: Tensor, half: bool) -> Tensor:
    """Rotary embedding of ``x [..., D]`` by ``table [..., 2 D]`` (sines, then cosines): pairs
    ``(x0, x1), (x2, x3), ...`` rotated, or the two halves when ``half``."""
    sin, cos = table.chunk(2, dim=-1)
    if half:
        first, second = x.chunk(2, dim=-1)
        turned = torch.cat([-second, first], dim=-1)
    else:
        turned = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)
    return (x * cos + turned * sin).to(x.dtype)


@loadable
def eva_qkv(attn: nn.Module, x: Tensor, rope: Tensor | None = None) -> QKV:
    """EVA attention's ``(q, k, v)`` ``[B, H, N, D]`` as its softmax sees them: projected, qk-normed,
    rotated by ``rope`` after the prefix tokens, keys and values repeated per grouped head."""
    b, n, _ = x.shape
    if attn.qkv is not None:
        if getattr(attn, "q_bias", None) is None:  # AttentionRope's bias sits in its qkv layer
            qkv = attn.qkv(x)
        else:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            qkv = attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, bias)
        q, k, v = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)
        q = attn.q_proj(x).reshape(b, n, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(b, n, kv_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).reshape(b, n, kv_heads, -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        p, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :p], _rotate(q[:, :, p:], rope, half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :p], _rotate(k[:, :, p:], rope, half)], dim=2).type_as(v)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return q, k, v


_EVA = dict(
    attention="attn",
    mask_kwarg="attn_mask",
    params=("rope", "attn_mask", "is_causal"),
    query=None,
    key=None,
    split_heads=False,
    scale="scale",
    heads="num_heads",
    value=None,
    value_chunk=None,
    project=eva_qkv,
    finish=timm_finish,
    dropout="attn_drop",
    token_kwargs=("rope",),
)
LAYOUTS = {
    "timm.models.eva.EvaBlock": BlockLayout(
        attn=("norm1", "attn", "gamma_1", "drop_path1"), mlp=("norm2", "mlp", "gamma_2", "drop_path2"), **_EVA
    ),
    "timm.models.eva.EvaBlockPostNorm": BlockLayout(
        attn=("attn", "norm1", "drop_path1"), mlp=("mlp", "norm2", "drop_path2"), **_EVA
    ),
}


def _random_rope(block: nn.Module) -> dict:
    """A random rotary table ``[7 - P, 2 D]`` for checking a block's layout on 7 tokens (``verify_layout``):
    any sines and cosines tell whether the rotation pairs the same channels as EVA's."""
    attn, param = block.attn, next(block.parameters())
    table = torch.randn(max(7 - attn.num_prefix_tokens, 0), 2 * attn.head_dim, generator=torch.Generator().manual_seed(1))
    return {"rope": table.to(param.device, param.dtype)}


@register_adapter
class TimmEva(TimmViT):
    name = "timm-eva"
    family = "timm Eva (EVA-01/EVA-02 eva*, rotary vit_*_rope_*, Perception Encoder vit_pe_*, DINOv3 vit_*_dinov3*)"
    layouts: ClassVar[dict[str, BlockLayout]] = LAYOUTS
    attn_requires: ClassVar[tuple[str, ...]] = ("num_heads", "head_dim", "num_prefix_tokens", "q_norm", "k_norm", "scale")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return EVA in class_names(model)

    def has_cls_token(self, model: nn.Module) -> bool:
        return model.cls_token is not None

    def layout(self, i: int, block: nn.Module) -> BlockLayout:
        layout = super().layout(i, block)
        if not any(n in ATTENTIONS for n in class_names(block.attn)):
            kind = type(block.attn).__qualname__
            raise TypeError(f"block {i} attention is a {kind}; supported attention classes: {ATTENTIONS}")
        return layout

    def example(self, model: nn.Module):
        return None if model.rope is None else _random_rope

    def install(self, model: nn.Module, patch: Patch) -> None:
        for i, block in enumerate(self.blocks(model)):
            self.layout(i, block)
            skip = block.attn.num_prefix_tokens
            if skip != model.num_prefix_tokens:
                raise TypeError(
                    f"block {i} attention rotates the tokens after {skip} prefix tokens, the model has "
                    f"{model.num_prefix_tokens}: tokenreduce cannot tell which tokens the rotary table covers"
                )
        super().install(model, patch)
