"""Hugging Face video ViTs (transformers 5.x): ``VideoMAEModel`` and ``VivitModel``, also inside their
``*ForVideoClassification`` wrappers. ``TimesformerModel`` and ``VideoMAEForPreTraining`` are refused.

Facts relied on (transformers 5.24): both embed a video ``[B, T, C, H, W]`` with one ``Conv3d`` whose
stride is its kernel, a tubelet of ``t x p x p`` pixels, so the tokens are the ``T/t * H/p * W/p`` tubelets
in (time, row, column) order; ViViT puts a class token in front, VideoMAE has none (its fixed sin-cos
positions are added before the layers). Their layers are pre-norm ViT layers over all those tokens:

- ``VivitLayer`` is laid out as ``ViTLayer``: ``attention(hidden_states, attention_mask)`` projects with
  ``q_proj``/``k_proj``/``v_proj`` and returns ``(output, weights)``; the proportional-attention bias
  reaches it as its additive ``attention_mask`` (eager and SDPA accept it, flash attention does not).
- ``VideoMAELayer`` runs ``layernorm_before``, ``VideoMAEAttention`` (an inner self-attention projecting
  ``query``/``key``/``value``, then ``output.dense`` and ``output.dropout``), the residual, then
  ``layernorm_after``, ``intermediate`` and ``output``, whose forward also adds the residual (so the MLP
  branch names ``output.dense`` and ``output.dropout``). The encoder calls each layer with the tokens
  alone and no mask reaches the attention, so tokenreduce runs it itself (``videomae_qkv``,
  scaled-dot-product attention, ``videomae_finish``), checked against each layer's own forward when
  patching; under ``attn_implementation="eager"`` that is still SDPA, equal up to float rounding.

Every encoder method acts on all space-time tokens as it does on the patch tokens of an image: ToMe
averages each tubelet's keys over the heads and merges by bipartite matching between any two tubelets,
whatever their time slices, as ToMe did on spatio-temporal MAE. Methods that read pixels (``vwt``,
``expedite``) see the tubelets as one tall image (:func:`~tokenreduce.core.tubelets_as_image`: time
slices stacked top to bottom, a tubelet's frames as channels), whose ``(p, p)`` patches are the tokens in
order; its patch grid is ``(T/t * H/p, W/p)``, so ``expedite``'s local windows at the bottom edge of one
time slice reach the top rows of the next. Methods that take the grid from the token count alone assume a
square one, which tubelets do not form: pass ``gtp`` ``grid=(T/t * H/p, W/p)`` (or ``graph="semantic"``)
and ``expedite`` ``clusters=(h, w)``; where the count is not a square their defaults raise.

``TimesformerModel`` is refused, with the reason: its (divided space-time) layers reshape the sequence to
``(B * H/p * W/p, T)`` for temporal attention and to ``(B * T, 1 + H/p * W/p)`` for spatial attention, using
the frame count and patch grid of the config, and average the class token's per-frame outputs. Reducing
within that factorisation needs one reduction shared by all frames (a method's choice on the spatial
positions, taken from a metric averaged over the frames, applied to every frame, the class token kept),
which the block engine, one sequence in and one out per block, does not express; its ``space_only`` and
``joint_space_time`` layers, plain blocks otherwise, return tuples and take ``output_attentions``, which the
engine does not follow either. ``VideoMAEForPreTraining`` is refused: its decoder needs every visible token.

``VideoMAEForVideoClassification`` with ``use_mean_pooling`` averages the final tokens inline in its
forward: after a merge that mean counts a merged token once, not by its size, and under a method with
per-video counts (``dtome``) it also averages the size-0 tokens that pad each row to the batch's longest, so
a video's logits depend on its batch. ``tokenreduce.record(model).size`` weighs ``VideoMAEModel``'s output
for a size-weighted mean (``tokenreduce.core.size_weighted_mean``) that is neither. ViViT's head reads the
class token, which no method merges. Under ``torch.export`` ViViT builds an all-true attention mask where
none was given (as transformers' ViT, SigLIP and DINOv2 do), which a reducing patch refuses as it refuses
any mask; ``torch.compile`` and eager runs pass no mask.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from tokenreduce.adapters.blocks import QKV, BlockLayout
from tokenreduce.adapters.hf_vision import VIT_LIKE, HFVisionTower, Tower, embedding_convs
from tokenreduce.registry import loadable, register_adapter


@loadable
def videomae_qkv(attn: nn.Module, x: Tensor) -> QKV:
    """``VideoMAEAttention``'s ``(q, k, v)`` ``[B, H, N, D]``: its inner self-attention's projections, split
    into heads."""
    inner = attn.attention
    return tuple(  # type: ignore[return-value]
        proj(x).unflatten(-1, (-1, inner.attention_head_size)).transpose(1, 2) for proj in (inner.query, inner.key, inner.value)
    )


@loadable
def videomae_finish(attn: nn.Module, x: Tensor, heads: Tensor) -> Tensor:
    """``VideoMAEAttention`` from the heads' outputs ``[B, H, N, D]``: heads merged, ``output`` (dense,
    dropout; it ignores its second argument)."""
    return attn.output(heads.transpose(1, 2).flatten(2), x)


VIDEOMAE_LAYOUT = BlockLayout(
    attn=("layernorm_before", "attention"),
    mlp=("layernorm_after", "intermediate", "output.dense", "output.dropout"),
    attention="attention",
    mask_kwarg=None,
    params=(),
    query=None,
    key=None,
    split_heads=False,
    scale="attention.scaling",
    heads="attention.num_attention_heads",
    value=None,
    value_chunk=None,
    project=videomae_qkv,
    finish=videomae_finish,
    dropout="attention.dropout_prob",
)

_VIDEOMAE = "transformers.models.videomae.modeling_videomae"
VIDEO_TOWERS = {
    f"{_VIDEOMAE}.VideoMAEModel": Tower(
        "encoder.layer", f"{_VIDEOMAE}.VideoMAELayer", VIDEOMAE_LAYOUT, False, query="attention.attention.query"
    ),
    "transformers.models.vivit.modeling_vivit.VivitModel": Tower(
        "layers", "transformers.models.vivit.modeling_vivit.VivitLayer", VIT_LIKE, True
    ),
}

REFUSED = {
    "transformers.models.timesformer.modeling_timesformer.TimesformerModel": (
        "TimeSformer's divided space-time attention regroups the tokens inside each layer, over time at each patch "
        "position and over space within each frame (the class token copied into every frame), by the frame count "
        "and patch grid of its config; merging or pruning space-time tokens breaks that grouping, and tokenreduce "
        "has no reduction shared by all frames"
    ),
    f"{_VIDEOMAE}.VideoMAEForPreTraining": (
        "its decoder places mask tokens after every visible token the encoder returns, position by position, "
        "which a reduced sequence cannot fill; patch its encoder, tokenreduce.apply(model.videomae, ...), to "
        "reduce the visible tokens' features"
    ),
}


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


@register_adapter
class HFVideoViT(HFVisionTower):
    name = "hf-video"
    family = "Hugging Face video ViTs (VideoMAEModel, VivitModel and their *ForVideoClassification)"
    towers: ClassVar[dict[str, Tower]] = VIDEO_TOWERS
    refused: ClassVar[dict[str, str]] = REFUSED

    def default_num_tokens(self, model: nn.Module) -> int | None:
        (conv,) = embedding_convs(model)
        frames, ph, pw = conv.kernel_size
        height, width = _pair(model.config.image_size)
        tubelets = (model.config.num_frames // frames) * (height // ph) * (width // pw)
        return tubelets + self.num_prefix_tokens(model)
