"""Hugging Face Mllama (Llama 3.2 Vision, transformers 5.x): cross-attention methods.

Facts relied on (transformers 5.24 and the spec's hooking notes): ``MllamaForConditionalGeneration.model``
is an ``MllamaModel`` whose vision model and projector give ``cross_attention_states [B * images * tiles,
tokens per tile, D]``, which a cross-attention layer reads as each row's ``N = images * tiles * tokens``
features in that order; the image features are not tokens of the LLM's sequence. Its
``forward`` expands ``cross_attention_mask [B, T, images, tiles]`` to an additive ``[B, 1, T, N]`` mask
(fully masked rows zeroed) and ``full_text_row_masked_out_mask [B, 1, T, 1]``, on every call, decode
steps included, and hands the three, with the same objects for every layer, to the decoder layers of
``language_model`` listed in ``cross_attention_layers``. Such a layer is called with keyword arguments
after ``hidden_states``; its ``cross_attn`` projects keys and values from the states (``k_proj`` then
per-head ``k_norm``, queries ``q_proj`` then ``q_norm``, no rotary) and stores them in its cache layer
on the prefill; on decode steps the states are ``None`` and the cached keys and values are read.

One mixin sits in front of every cross-attention decoder layer. At the first one, on a prompt, the
method chooses per row among the features from that layer's own queries and keys (recomputed beside
its attention, which keeps its implementation); every cross-attention layer of the prompt then gets
the kept features and the mask cut to them, so their keys, values and cache hold the kept features
only. The choice travels on the cache, and each decode step's re-expanded mask is cut the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from tokenreduce.adapters.base import Adapter, BlockCost, class_names
from tokenreduce.core import head_received_attention
from tokenreduce.methods.base import Method
from tokenreduce.methods.cross_attention import CrossAttentionContext, CrossAttentionMethod
from tokenreduce.patch import ATTR, Patch, original_class
from tokenreduce.registry import loadable, method_classes, method_names, register_adapter
from tokenreduce.stages import Stage

MODEL = "transformers.models.mllama.modeling_mllama.MllamaModel"
TRIM = "_tokenreduce_trim"  # attribute on a generate call's cache: the prompt's kept features
MASKS = ("cross_attention_mask", "full_text_row_masked_out_mask")  # the layers' mask arguments, cut together


@dataclass(frozen=True)
class Trim:
    """The image features a prompt kept: ``index [B, K]`` into each row's ``features`` (rows that kept
    fewer padded with copies of their first kept one), ``real [B, K]`` False on that padding."""

    index: Tensor
    real: Tensor
    features: int

    @classmethod
    def pad(cls, kept: list[Tensor], features: int) -> Trim:
        """From each row's kept indices (counts may differ)."""
        width = max(k.shape[0] for k in kept)
        index = torch.stack([torch.cat([k, k[:1].expand(width - k.shape[0])]) for k in kept])
        real = torch.arange(width, device=index.device) < torch.tensor([k.shape[0] for k in kept], device=index.device)[:, None]
        return cls(index, real, features)

    def states(self, states: Tensor) -> Tensor:
        """``states [B, N, D]`` -> the kept features ``[B, K, D]``."""
        return states.gather(1, self.index[..., None].expand(-1, -1, states.shape[-1]))

    def mask(self, mask: Tensor | None, rows: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """The additive cross-attention mask ``[B, 1, q, N]`` and its row mask ``[B, 1, q, 1]`` as the model
        builds them from a mask over the kept features alone: cut to the kept columns, padding masked,
        and a row none of whose kept features it may read fully masked (its mask zeroed, as the model
        zeroes one; the padding stays masked, so the row reads the real kept features evenly)."""
        if mask is None:  # one row (a batch needs its mask): no padding to mask
            return None, rows
        if mask.shape[-1] != self.features:
            raise ValueError(f"the cross-attention mask covers {mask.shape[-1]} image features; the prompt had {self.features}")
        low = torch.finfo(mask.dtype).min
        padding = ~self.real[:, None, None, :]
        cut = mask.gather(-1, self.index[:, None, None, :].expand(*mask.shape[:-1], -1)).masked_fill(padding, low)
        readable = (cut != low).any(dim=-1, keepdim=True)
        if rows is not None:
            readable = readable & rows.bool()
        rows = None if rows is None else readable.to(rows.dtype)
        return torch.where(padding, low, cut * readable.to(cut.dtype)), rows


@dataclass(frozen=True)
class CrossAttentionRecord:
    """What the calling thread's last prompt kept: of each row's ``features`` image features, the
    indices ``kept[b]`` (ascending), chosen at cross-attention layer ``layer``."""

    features: int
    kept: tuple[Tensor, ...]
    layer: int


@dataclass
class TrimRun:
    """One prompt's forward: its features (``source``) and what every cross-attention layer reads."""

    source: Tensor
    trim: Trim
    states: Tensor
    arguments: dict  # (mask object, rows object) -> their cut


@dataclass
class MllamaThread:
    run: TrimRun | None = None
    record: CrossAttentionRecord | None = None


def _thread(patch: Patch) -> MllamaThread:
    local = patch.local
    if not hasattr(local, "mllama"):
        local.mllama = MllamaThread()
    return local.mllama


def _cache_holds(cache, index: int) -> bool:
    """Whether ``cache``'s layer ``index`` already holds keys (features of an earlier prompt)."""
    if cache is None or index >= len(cache.layers):
        return False
    keys = getattr(cache.layers[index], "keys", None)
    return keys is not None and keys.numel() > 0


def _check_cache(cache, index: int) -> None:
    if cache is None:
        return
    if any("Static" in type(layer).__name__ for layer in cache.layers):
        raise ValueError(
            f"trimming cross-attended features needs a dynamic cache (the cross-attention layers hold fewer features); "
            f"got {type(cache).__name__}: use the default DynamicCache (no cache_implementation='static')"
        )
    if _cache_holds(cache, index):
        raise ValueError(
            "the cache already holds image features of an earlier prompt; continuing it with new images is not supported"
        )


def _received(layer: nn.Module, hidden: Tensor, states: Tensor, mask: Tensor | None, readers: Tensor) -> Tensor:
    """``[B, H, N]``: per head, the cross-attention of ``layer`` each feature of ``states`` receives from
    the tokens ``readers [B, T]`` of its input ``hidden``, from its own norms and projections."""
    attn = layer.cross_attn
    b, t, _ = hidden.shape
    q = attn.q_proj(layer.input_layernorm(hidden)).view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(states).view(b, states.shape[1], attn.num_key_value_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_norm(k).repeat_interleave(attn.num_key_value_groups, dim=1)
    return head_received_attention(attn.q_norm(q), k, attn.scaling, mask, readers)


@loadable
class TrimmingCrossLayer:
    """Mixed in front of every cross-attention decoder layer (see the module docstring)."""

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        if args:
            raise TypeError("tokenreduce calls Mllama's cross-attention layers with keyword arguments only")
        patch: Patch = getattr(self, ATTR)
        thread = _thread(patch)
        states, cache = kwargs.get("cross_attention_states"), kwargs.get("cache")
        if states is not None:
            if self._tokenreduce_first:
                thread.run = _choose(patch, self, hidden_states, kwargs)
            run = thread.run
            if run is None or run.source is not states:
                raise RuntimeError(
                    f"cross-attention layer {self.layer_idx} got image features the first cross-attention layer did not see"
                )
            kwargs = {**kwargs, "cross_attention_states": run.states, **_cut(run, kwargs)}
            if self._tokenreduce_last:
                thread.run = None  # the features are in the cache now
        else:
            trim: Trim | None = getattr(cache, TRIM, None) if cache is not None else None
            if trim is not None:
                kwargs = {**kwargs, **dict(zip(MASKS, trim.mask(*(kwargs.get(k) for k in MASKS))))}
        return super().forward(hidden_states, **kwargs)  # type: ignore[misc]


def _choose(patch: Patch, layer: nn.Module, hidden: Tensor, kwargs: dict) -> TrimRun:
    """The method's choice at the first cross-attention layer of a prompt."""
    cache = kwargs.get("cache")
    _check_cache(cache, layer.layer_idx)
    source, mask, rows = (kwargs.get(k) for k in ("cross_attention_states", *MASKS))
    states = source.reshape(hidden.shape[0], -1, source.shape[-1])  # the model passes [B * images * tiles, tokens, D]
    if rows is None and hidden.shape[0] > 1:
        raise ValueError(
            "trimming cross-attended features of a batch needs its cross_attention_mask (as the processor gives it): "
            "it says which tokens read the images, padding excluded"
        )
    readers = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device) if rows is None else rows[:, 0, :, 0].bool()
    ctx = CrossAttentionContext(layer.layer_idx, _received(layer, hidden, states, mask, readers))
    method: CrossAttentionMethod = patch.method  # type: ignore[assignment]
    kept = [selection.index[0] for selection in method.select(ctx)]
    trim = Trim.pad(kept, states.shape[1])
    _thread(patch).record = CrossAttentionRecord(states.shape[1], tuple(kept), layer.layer_idx)
    if cache is not None:
        setattr(cache, TRIM, trim)
    return TrimRun(source, trim, trim.states(states), {})


def _cut(run: TrimRun, kwargs: dict) -> dict:
    """The prompt's mask and row mask cut to the kept features, once per forward (every layer gets the same objects)."""
    mask, rows = (kwargs.get(k) for k in MASKS)
    key = (id(mask), id(rows))
    if key not in run.arguments:
        run.arguments[key] = dict(zip(MASKS, run.trim.mask(mask, rows)))
    return run.arguments[key]


def _cross_methods() -> list[str]:
    return [n for n in method_names() if any(issubclass(c, CrossAttentionMethod) for c in method_classes(n).values())]


@register_adapter
class HFMllama(Adapter):
    name = "hf-mllama"
    family = "Hugging Face Mllama (MllamaForConditionalGeneration, Llama 3.2 Vision)"
    stages: ClassVar[tuple[Stage, ...]] = (Stage.LLM,)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return MODEL in class_names(model)

    def cross_layers(self, model: nn.Module) -> list[int]:
        return sorted(model.language_model.cross_attention_layers)

    # The vision side is not reduced: no encoder-stage blocks to count.
    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 0

    def has_cls_token(self, model: nn.Module) -> bool:
        return False

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return []

    def default_num_tokens(self, model: nn.Module) -> int | None:
        return None

    def block_costs(self, model: nn.Module) -> list[BlockCost]:
        return []

    def stem_head_macs(self, model: nn.Module, num_tokens: int) -> int:
        return 0

    def summary(self, model: nn.Module) -> str:
        return f"{original_class(model).__name__}: cross-attention layers {self.cross_layers(model)}"

    def validate(self, model: nn.Module, method: Method) -> None:
        if not isinstance(method, CrossAttentionMethod):
            raise TypeError(
                f"method {method.name!r} reduces visual tokens in the LLM's sequence; {type(model).__name__} has none there: "
                f"its image features reach the LLM only through the cross-attention layers {self.cross_layers(model)} "
                f"(stage {Stage.LLM}, cross-attention methods only: {', '.join(_cross_methods())})"
            )
        if not self.cross_layers(model):
            raise ValueError(
                f"{type(model).__name__} has no cross-attention layers (text_config.cross_attention_layers is empty)"
            )

    def plan(self, model: nn.Module, method: Method) -> list[str]:
        layers = self.cross_layers(model)
        return [
            f"image features read by cross-attention layers {', '.join(map(str, layers))}: chosen at layer {layers[0]}; "
            f"{method.describe_rule()}"  # type: ignore[attr-defined]
        ]

    def install(self, model: nn.Module, patch: Patch) -> None:
        layers = self.cross_layers(model)
        for i in layers:
            layer = model.language_model.layers[i]
            patch.set_attr(layer, ATTR, patch)
            patch.set_attr(layer, "_tokenreduce_first", i == layers[0])
            patch.set_attr(layer, "_tokenreduce_last", i == layers[-1])
            patch.swap_class(layer, TrimmingCrossLayer)

    def record(self, patch: Patch) -> CrossAttentionRecord | None:
        return _thread(patch).record

    def example_inputs(self, model: nn.Module, batch_size: int, prompt_tokens: int, seed: int = 0) -> dict[str, Tensor]:
        """A batch of prompts of one random image of the most tiles the model takes (its first supported
        aspect ratio of ``max_num_tiles`` tiles) and ``prompt_tokens`` random text tokens each, half
        before its ``<|image|>`` token and half after, which read the image, as the processor lays them out."""
        config, vision = model.config, model.config.vision_config
        gen = torch.Generator().manual_seed(seed)
        tiles = vision.max_num_tiles
        ratio = next(i for i, (h, w) in enumerate(vision.supported_aspect_ratios) if h * w == tiles) + 1
        image_id = int(config.image_token_id)
        text = torch.randint(3, min(config.text_config.vocab_size, 32000), (batch_size, prompt_tokens), generator=gen)
        text = text.masked_fill(text == image_id, 3)
        before = prompt_tokens // 2
        ids = torch.cat([text[:, :before], torch.full((batch_size, 1), image_id), text[:, before:]], dim=1)
        side = vision.image_size
        cross = torch.zeros(batch_size, ids.shape[1], 1, tiles, dtype=torch.long)
        cross[:, before:] = 1  # the image token and the text after it read every tile
        return dict(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=torch.randn(batch_size, 1, tiles, 3, side, side, generator=gen),
            aspect_ratio_ids=torch.full((batch_size, 1), ratio),
            aspect_ratio_mask=torch.ones(batch_size, 1, tiles, dtype=torch.long),
            cross_attention_mask=cross,
        )
