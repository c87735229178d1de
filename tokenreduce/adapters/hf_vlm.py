"""Hugging Face vision-language models (transformers 5.x): encoder and pre-LLM stages.

Facts relied on (transformers 5.24 and the spec's hooking notes): ``XForConditionalGeneration.model``
is an ``XModel`` whose ``get_image_features`` runs the vision tower, takes the hidden states of
``vision_feature_layer`` and projects them (``pooler_output``: one tensor per image). Its ``forward``
embeds ``input_ids``, scatters the image features over the image placeholder tokens in row-major
order (checking that the counts match), then calls its ``language_model`` with the keyword arguments
``inputs_embeds``, ``attention_mask``, ``position_ids`` and ``cache``. ``generate`` calls
``get_image_features`` itself before the prefill (``mm_encoder_outputs``), computes position ids
once from the full prompt and adds one per step, and grows the 2-D mask from the prompt's length.

No forward is re-implemented; mixins sit at four places:
- ``XModel.forward`` opens the per-call :class:`VisualState` (where the image tokens of the prompt are);
- the projector, for encoder-stage methods and for methods that select among the vision encoder's
  hidden states (VisionZip): it reduces, then writes each image's kept tokens to the front of a span of
  the original length, so that the model's own placeholder check and scatter run unchanged, and
  leaves what each image kept for the prompt that will read these features (``generate`` computes
  them before the prefill, so this cannot wait for the forward);
- AnyRes packing (``XModel.pack_image_features``, LLaVA-NeXT and OneVision): for methods that read
  the packed spans' layout (GlobalCom2), it records which crop and patch each packed token comes from;
- the LLM: at the prompt, a pre-LLM method selects among each image span's embeddings (they are the
  projected features), then every span shrinks to its kept tokens in the embeddings, the 2-D mask and
  the position ids, re-padding rows that lost different amounts; on decode steps the mask ``generate``
  grew is shortened and reindexed positions move back. The compaction travels on the cache.
- each self-attention of the LLM, for virtual token unmerging (DyMU): at the prompt, the module's own
  forward runs on the merged tokens spread back over the full prompt, with the full prompt's position
  ids, rotary tables and mask (``create_causal_mask`` of the text model's module), and each merged
  token's output is the mean over its places; decode steps pass through.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from tokenreduce.adapters import hf_llm
from tokenreduce.adapters.base import Adapter, BlockCost, class_names
from tokenreduce.adapters.hf_llm import LLMRun, LLMStep
from tokenreduce.adapters.hf_vision import TOWERS, HFVisionTower
from tokenreduce.core import Selection, cls_attention
from tokenreduce.core.selection import first_inputs
from tokenreduce.core.sequence import Compaction, SpanKeep, compact, expand_tokens, expansion_index, image_spans, merge_mean
from tokenreduce.methods.base import EncoderMethod, Method
from tokenreduce.methods.cross_attention import CrossAttentionMethod
from tokenreduce.methods.llm import ImageSpan, LLMMethod
from tokenreduce.methods.stack import parts
from tokenreduce.methods.visual import AnyResLayout, VideoLayout, VisualContext, VisualMethod
from tokenreduce.patch import ATTR, CaptureOutput, Patch, original_class
from tokenreduce.registry import loadable, register_adapter
from tokenreduce.stages import Stage
from tokenreduce.state import Record

COMPACTION = "_tokenreduce_compaction"  # attribute on a generate call's cache


@dataclass(frozen=True)
class ImageRecord:
    """What one image sent to the LLM.

    ``placeholders``: its visual tokens before reduction; ``kept``: the tokens the LLM read for it;
    ``owner [placeholders]``: the kept token covering each original visual token (-1 where dropped);
    ``position [kept]``: the original visual token whose position each kept token took;
    ``grid``: (rows, cols) of the visual tokens when they form one (a video's: of each of its
    ``frames`` frames).
    """

    placeholders: int
    kept: int
    owner: Tensor
    position: Tensor
    grid: tuple[int, int] | None
    frames: int = 1


@dataclass(frozen=True)
class VLMRecord:
    """What the calling thread's last prompt (a forward with images, or ``generate``'s prefill) did.

    ``input_lengths`` / ``llm_lengths``: per row, the tokens (padding excluded) the LLM would have read
    and did read. ``positions``: ``"keep"`` or ``"reindex"``. ``encoder``: the vision encoder's record
    when an encoder-stage method ran. In-LLM methods: ``layer_lengths`` per decoder layer the real
    tokens of each row it read, ``steps`` what each pruning layer kept, and ``images`` what the last
    layers read of each image. ``videos``: what each video sent to the LLM, as ``images`` (when a part
    of the method acts on videos). ``decode_steps``: for an in-LLM method that selects cached entries on
    decode steps (DyCoke), per decode step so far, per span it acts on, the indices of the span's tokens
    that the layers from its decode layer read.
    """

    images: tuple[ImageRecord, ...]
    input_lengths: tuple[int, ...]
    llm_lengths: tuple[int, ...]
    positions: str
    encoder: Record | None
    layer_lengths: tuple[tuple[int, ...], ...] = ()
    steps: tuple[LLMStep, ...] = ()
    videos: tuple[ImageRecord, ...] = ()
    decode_steps: list[tuple[Tensor, ...]] = dataclasses.field(default_factory=list)


@dataclass
class VisualState:
    """One ``XModel`` forward call: where its prompt's image tokens are."""

    placeholder: Tensor | None  # [B, L] True on image tokens
    mask: Tensor | None  # [B, L] the prompt's 2-D attention mask (None: no padding)
    grids: list[tuple[int, int] | None]  # per image, its visual tokens' grid when the inputs say it
    reindex: bool  # tokens kept before the LLM get consecutive position ids
    llm_reindex: bool  # tokens kept inside the LLM get consecutive position ids
    text: Tensor | None = None  # [B, L] True on the prompt's text tokens, for methods that read them
    video: Tensor | None = None  # [B, L] True on video tokens, when a part of the method acts on videos
    videos: list[VideoLayout] = dataclasses.field(default_factory=list)  # per video of the prompt, in order
    video_tail: int = 0  # tokens after each video's frames in its span (OneVision's newline)
    active: bool = True

    def is_prompt(self, embeds: Tensor) -> bool:
        """Whether the LLM's input ``embeds`` is this forward's prompt with visual tokens to route."""
        if not self.active or self.placeholder is None or embeds.shape[1] != self.placeholder.shape[1]:
            return False
        return bool(self.placeholder.any()) or (self.video is not None and bool(self.video.any()))

    def video_spans(self) -> list[tuple[int, int, int]]:
        """``(row, start, tokens)`` of every video's span, in prompt order (runs of video tokens cut by
        the videos' token counts, which :attr:`videos` gives)."""
        assert self.video is not None
        counts = [layout.tokens + self.video_tail for layout in self.videos]
        spans, runs = [], image_spans(self.video)
        for row, start, length in runs:
            while length > 0:
                if len(spans) == len(counts) or counts[len(spans)] > length:
                    raise ValueError(
                        f"the prompt's video token runs {[n for _, _, n in runs]} do not hold videos of {counts} tokens"
                    )
                n = counts[len(spans)]
                spans.append((row, start, n))
                start, length = start + n, length - n
        if len(spans) != len(counts):
            raise ValueError(f"the prompt has video token runs for {len(spans)} videos, and {len(counts)} videos were given")
        return spans

    def prompt_mask(self, embeds: Tensor) -> Tensor:
        """The prompt's 2-D mask, all ones when the call passed none."""
        return self.mask if self.mask is not None else torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)


@dataclass
class ReducedImages:
    """Features the projector reduced (kept tokens at the front of full-length spans), waiting for the
    prompt that reads them. Before AnyRes packing there is one entry per crop, and ``kept`` holds the
    kept tokens with ``rank`` saying how packing orders them (see :meth:`HFVLM.pack_reduced`)."""

    features: Tensor  # [M, N, D], or the packed spans [sum of N_i, D]
    images: list[ImageRecord]
    encoder: Record | None
    kept: Tensor | None = None  # [M, k, D]
    rank: Tensor | None = None  # [M, k]: IN_PLACE, CLASS_TOKEN or SUMMARY


IN_PLACE, CLASS_TOKEN, SUMMARY = 0, 1, 2  # kinds of kept tokens, in their AnyRes packing order


@dataclass
class VLMThread:
    """One thread's VLM state: its running or last forward, its last prompt's record, the vision
    layer's captures, and features reduced but not yet read."""

    state: VisualState | None = None
    record: VLMRecord | None = None
    hidden: Tensor | None = None
    q: Tensor | None = None
    k: Tensor | None = None
    shallow_q: Tensor | None = None  # a second vision layer's queries and keys, for methods asking
    shallow_k: Tensor | None = None
    reduced: ReducedImages | None = None
    attention: tuple | None = None  # Qwen's last vision block: (input, cos, sin)
    anyres: list[AnyResLayout] | None = None  # the last packed images' span layouts, for methods that read them
    llm: LLMRun | None = None  # the prefill being pruned inside the LLM
    images: bool = False  # inside get_image_features (Qwen: the vision tower also encodes videos)
    unmerging: Unmerging | None = None  # the prefill whose attention runs over every patch (DyMU's VTU)
    video_grid: Tensor | None = None  # Qwen: the video_grid_thw of the videos generate() encoded before the prefill


@dataclass
class Unmerging:
    """A prefill with virtual token unmerging: the LLM reads ``length`` merged tokens per row, and its
    attention layers read them spread over the full prompt (``index [B, L]``: the merged token at each
    place, see :func:`~tokenreduce.core.sequence.expansion_index`) with the full prompt's position
    ids, rotary tables and attention mask."""

    index: Tensor
    length: int
    position_ids: Tensor
    position_embeddings: tuple[Tensor, Tensor]
    mask: object  # what the model's mask factory gives the full prompt (None, a tensor or a block mask)


def _thread(patch: Patch) -> VLMThread:
    local = patch.local
    if not hasattr(local, "vlm"):
        local.vlm = VLMThread()
    return local.vlm


@loadable
class CaptureVision(CaptureOutput):
    """Stores the read vision layer's output, queries or keys for a vision-space method."""

    def _tokenreduce_target(self):
        return _thread(getattr(self, ATTR))


@dataclass(frozen=True)
class Family:
    """Where a VLM family keeps its parts (attribute names on ``XModel``) and how its prompts look.

    ``vision``: the vision tower (encoder-stage and vision-space methods need one tokenreduce's encoder
    adapter supports); ``projector``: a token-wise projector whose output goes straight into the image
    spans, which those methods also need (``None`` when it pools, pixel-shuffles or is followed by
    AnyRes packing); ``tile``: the model or config attribute giving the visual tokens of one square tile
    (``"tower"``: the tower's patch grid, and every image has exactly that many); ``mrope``:
    multi-row position ids that encode the image grid (Qwen); ``merge``: the config path of the
    spatial merge of Qwen's grid (``image_grid_thw`` counts patches before it); ``anyres``: the
    projected crops of an image are packed (unpadded, with newline tokens) by the model's
    ``pack_image_features`` into one span (LLaVA-NeXT, OneVision).
    """

    text: str = "language_model"
    vision: str = "vision_tower"
    projector: str | None = "multi_modal_projector"
    image_token: str = "image_token_id"
    tile: str | None = None
    mrope: bool = False
    merge: str | None = None
    anyres: bool = False
    frame: tuple[str, str] | None = None  # config ids of the tokens around an image's span
    type_ids: str | None = None  # the forward argument marking image tokens (1) among text (0)
    tiles: bool = False  # pixel_values [B, tiles, 3, H, W] (Idefics3)
    video: str | None = None  # how videos are laid out: "thw" (Qwen's video_grid_thw), "frames" (OneVision)


_QWEN = Family(
    vision="visual",
    projector=None,
    mrope=True,
    merge="vision_config.spatial_merge_size",
    frame=("vision_start_token_id", "vision_end_token_id"),
    type_ids="mm_token_type_ids",
)
_QWEN_VIDEO = dataclasses.replace(_QWEN, video="thw")
_IDEFICS = Family(text="text_model", vision="vision_model", projector=None, tile="image_seq_len", tiles=True)
FAMILIES = {
    "transformers.models.llava.modeling_llava.LlavaModel": Family(tile="tower"),
    "transformers.models.llava_next.modeling_llava_next.LlavaNextModel": Family(anyres=True),
    "transformers.models.llava_onevision.modeling_llava_onevision.LlavaOnevisionModel": Family(anyres=True, video="frames"),
    "transformers.models.qwen2_vl.modeling_qwen2_vl.Qwen2VLModel": _QWEN_VIDEO,
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLModel": _QWEN_VIDEO,
    "transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLModel": _QWEN,
    "transformers.models.idefics3.modeling_idefics3.Idefics3Model": _IDEFICS,
    "transformers.models.smolvlm.modeling_smolvlm.SmolVLMModel": _IDEFICS,
    "transformers.models.internvl.modeling_internvl.InternVLModel": Family(projector=None, tile="image_seq_length"),
    "transformers.models.gemma3.modeling_gemma3.Gemma3Model": Family(
        projector=None,
        tile="mm_tokens_per_image",
        image_token="image_token_index",
        frame=("boi_token_index", "eoi_token_index"),
        type_ids="token_type_ids",
    ),
}
FAMILY_NAMES = (
    "LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration, "
    "Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration, "
    "Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration, InternVLForConditionalGeneration, "
    "Gemma3ForConditionalGeneration"
)
VIDEO_FAMILY_NAMES = "Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, LlavaOnevisionForConditionalGeneration"


def _family(model: nn.Module) -> Family | None:
    return next((FAMILIES[n] for n in class_names(model) if n in FAMILIES), None)


def _records(selection: Selection, offset: int, placeholders: int, grid: tuple[int, int] | None) -> list[ImageRecord]:
    """One record per row of a selection over tokens whose first ``offset`` are not visual tokens of
    the LLM (a class token); an output whose representative is such a token takes the first position."""
    owner = selection.slot[:, offset:]
    position = (selection.index - offset).clamp(min=0)
    return [ImageRecord(placeholders, selection.num_out, o, p, grid) for o, p in zip(owner, position)]


def _records_from_owner(owner: Tensor, kept: int, grid: tuple[int, int] | None, variable: bool) -> list[ImageRecord]:
    """Records for an encoder-stage reduction: ``owner [M, N]`` maps each visual token to one of ``kept``
    outputs; an output takes the position of the first visual token it covers. ``variable``: each image
    has its own count (its real outputs come first, the padding after them covers no visual token)."""
    n = owner.shape[1]
    counts = (owner.amax(dim=1) + 1).tolist() if variable else [kept] * owner.shape[0]
    return [ImageRecord(n, k, o, f[:k], grid) for o, f, k in zip(owner, first_inputs(owner, kept), counts)]


def _text_tokens(config, input_ids: Tensor, placeholder: Tensor, mask: Tensor | None) -> Tensor:
    """``[B, L]`` True on a prompt's text: neither image nor video placeholders nor padding."""
    text = ~placeholder
    if mask is not None:
        text &= mask.bool()
    video = getattr(config, "video_token_id", None)
    if isinstance(video, int):
        text &= input_ids != video
    return text


def _packed_text(embeds: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's text embeddings packed to the front: ``embeds [B, L, D]`` at ``text [B, L]`` ->
    ``([B, T, D] with zeros after a row's own text, [B, T] mask)``, ``T`` the most text of a row, at
    least 1 (a prompt of image tokens alone reads as one with all its text padded away)."""
    counts = text.sum(1)
    width = max(1, int(counts.max()))
    order = (~text).to(torch.int8).argsort(dim=1, stable=True)[:, :width]  # text positions first, in order
    valid = torch.arange(width, device=embeds.device) < counts[:, None]
    packed = embeds.gather(1, order[..., None].expand(-1, -1, embeds.shape[-1]))
    return packed * valid[..., None].to(packed.dtype), valid


def _paired_text(embeds: Tensor, text: Tensor, placeholder: Tensor, spans: list) -> tuple[Tensor, Tensor]:
    """Each image span's paired text, packed as :func:`_packed_text` packs a prompt's: the text tokens
    (``text [B, L]``) after the span's run of placeholders up to the next run, ``spans`` as
    ``(row, start, n)``. Runs are numbered along each row, and a text token pairs with the run before it."""
    before = torch.zeros_like(placeholder)
    before[:, 1:] = placeholder[:, :-1]
    starts = placeholder & ~before
    run = starts.cumsum(dim=1)  # [B, L]: the number of runs begun at or before each position
    rows = torch.tensor([row for row, _, _ in spans], device=embeds.device)
    own = run[rows, torch.tensor([start for _, start, _ in spans], device=embeds.device)]
    return _packed_text(embeds[rows], text[rows] & (run[rows] == own[:, None]))


def _front(kept: Tensor, length: int) -> Tensor:
    """``[M, k, D]`` kept tokens at the front of ``length``-token spans (zeros after)."""
    return torch.cat([kept, kept.new_zeros(kept.shape[0], length - kept.shape[1], kept.shape[2])], dim=1)


def _whole(n: int, grid: tuple[int, int] | None, frames: int = 1, device: torch.device | None = None) -> ImageRecord:
    """The record of an image or video span of ``n`` tokens that the LLM reads whole."""
    every = torch.arange(n, device=device)
    return ImageRecord(n, n, every, every, grid, frames)


def _modalities(method: Method | None) -> frozenset[str]:
    """What a part of a method acts on (encoder-stage methods: images)."""
    return frozenset() if method is None else getattr(method, "modalities", frozenset({"image"}))


@loadable
class VLMModel:
    """Mixed in front of ``XModel``: opens the forward's :class:`VisualState`."""

    def forward(self, *args, **kwargs):
        patch: Patch = getattr(self, ATTR)
        adapter: HFVLM = patch.adapter  # type: ignore[assignment]
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        encoded = kwargs.get("mm_encoder_outputs") or {}
        images = kwargs.get("pixel_values", args[1] if len(args) > 1 else None) is not None or encoded.get("image") is not None
        if images and input_ids is None:
            raise ValueError("token reduction in a VLM needs input_ids (to find the image tokens), not only inputs_embeds")
        videos = kwargs.get("pixel_values_videos") is not None or encoded.get("video") is not None
        # without images or videos (a decode step, a text prompt) placeholder ids are plain tokens: a
        # generated one must not read as an image to route
        routed = input_ids is not None and (images or videos)
        placeholder = input_ids == getattr(self.config, adapter.spec(self).image_token) if routed else None
        if images and not placeholder.any():
            raise ValueError("images were given but the prompt (input_ids) has no image tokens")
        mask = kwargs.get("attention_mask")
        grids = adapter.grids(self, kwargs.get("image_grid_thw"))
        before, inside = parts(patch.method)
        state = VisualState(placeholder, mask, grids, adapter.reindex(self, before), adapter.reindex(self, inside))
        if videos and input_ids is not None and any("video" in _modalities(m) for m in (before, inside)):
            state.video = input_ids == self.config.video_token_id
            state.videos, state.video_tail = adapter.video_layouts(self, patch, kwargs)
        if images and getattr(before, "needs_text", False):  # the prompt, not a decode step
            state.text = _text_tokens(self.config, input_ids, placeholder, mask)
        _thread(patch).state = state
        try:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        finally:
            state.active = False


@loadable
class GridVLMModel(VLMModel):
    """:class:`VLMModel` of a Qwen family: ``generate`` encodes videos before the prefill and then passes
    their features without ``video_grid_thw``, so the grid is kept for the prompt that reads them."""

    # Qwen's own signature: generate() reads it to pass the video inputs.
    def get_video_features(self, pixel_values_videos: Tensor, video_grid_thw: Tensor | None = None, **kwargs):
        _thread(getattr(self, ATTR)).video_grid = video_grid_thw
        return super().get_video_features(pixel_values_videos, video_grid_thw, **kwargs)  # type: ignore[misc]


@loadable
class PackingVLMModel(VLMModel):
    """:class:`VLMModel` of an AnyRes family whose crops are reduced before the projector: packs each
    image's kept tokens in place of its crops' grids (see :meth:`HFVLM.pack_reduced`)."""

    def pack_image_features(self, image_features, image_sizes, *args, **kwargs):
        def pack(features: list[Tensor], newline: Tensor):
            kw = {**kwargs, "image_newline": newline}
            return super(PackingVLMModel, self).pack_image_features(features, image_sizes, *args, **kw)

        patch: Patch = getattr(self, ATTR)
        return patch.adapter.pack_reduced(self, patch, image_features, image_sizes, pack)  # type: ignore[attr-defined]


@loadable
class TracingVLMModel(VLMModel):
    """:class:`VLMModel` of an AnyRes family for a method that reads its packed spans' layout: records
    the layout of every image the model packs (see :meth:`HFVLM.anyres_layouts`)."""

    def pack_image_features(self, image_features, image_sizes, *args, **kwargs):
        patch: Patch = getattr(self, ATTR)
        _thread(patch).anyres = patch.adapter.anyres_layouts(self, image_sizes)  # type: ignore[attr-defined]
        return super().pack_image_features(image_features, image_sizes, *args, **kwargs)  # type: ignore[misc]


@loadable
class MergingVLMModel(GridVLMModel):
    """:class:`VLMModel` of a Qwen family when a method selects among the vision encoder's states:
    image features are reduced before Qwen's patch merger (see :meth:`HFVLM.merge_reduced`)."""

    # Qwen's own signature: generate() reads it to pass the image inputs.
    def get_image_features(self, pixel_values: Tensor, image_grid_thw: Tensor | None = None, **kwargs):
        patch: Patch = getattr(self, ATTR)
        thread = _thread(patch)
        thread.images = True
        try:
            out = super().get_image_features(pixel_values, image_grid_thw, **kwargs)  # type: ignore[misc]
        finally:
            thread.images = False
        return patch.adapter.merge_reduced(self, patch, image_grid_thw, out)  # type: ignore[attr-defined]


@loadable
class DeferredMerger:
    """Mixed in front of Qwen's patch merger: while image features are computed, stores the patches
    and passes zeros of the merged shape on; :meth:`HFVLM.merge_reduced` merges the kept tokens only."""

    def forward(self, x: Tensor) -> Tensor:
        thread = _thread(getattr(self, ATTR))
        if not thread.images:
            return super().forward(x)  # type: ignore[misc]
        thread.hidden = x
        return x.new_zeros(x.shape[0] // self._tokenreduce_group, self._tokenreduce_width)


@loadable
class CaptureAttentionInput:
    """Mixed in front of Qwen's last vision attention: stores its input and rotary tables."""

    def forward(self, hidden_states: Tensor, *args, position_embeddings=None, **kwargs):
        thread = _thread(getattr(self, ATTR))
        if thread.images:
            thread.attention = (hidden_states, *position_embeddings)
        return super().forward(hidden_states, *args, position_embeddings=position_embeddings, **kwargs)  # type: ignore[misc]


@loadable
class ReducingProjector:
    """Mixed in front of a token-wise projector: reduces each image (encoder-stage owners, or a
    vision-space method on the captured hidden states) and pads it back to a full span."""

    def forward(self, x: Tensor) -> Tensor:
        patch: Patch = getattr(self, ATTR)
        adapter: HFVLM = patch.adapter  # type: ignore[assignment]
        return adapter.project_reduced(self, patch, x, lambda t: super(ReducingProjector, self).forward(t))


@loadable
class CompactingLLM:
    """Mixed in front of the VLM's LLM: shortens the prompt to the kept visual tokens, and decode steps
    to match (see :class:`~tokenreduce.core.sequence.Compaction`)."""

    def forward(self, *args, **kwargs):
        if args:
            raise TypeError("tokenreduce calls a VLM's language model with keyword arguments only")
        patch: Patch = getattr(self, ATTR)
        state = _thread(patch).state
        cache = kwargs.get("cache")
        if state is not None and state.is_prompt(kwargs["inputs_embeds"]):
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError(
                    "pre-LLM token reduction needs the prompt to start an empty cache; continuing a cache is not supported"
                )
            adapter: HFVLM = patch.adapter  # type: ignore[assignment]
            before, inside = parts(patch.method)
            compaction = None
            unmerge = before is not None and before.unmerges_in_llm
            full = dict(kwargs) if unmerge else {}  # the full prompt's arguments, for virtual unmerging
            if before is not None:
                scale = getattr(self, "_tokenreduce_scale", None)  # of the vision layer, for class-token attention
                compaction = adapter.compact_prompt(patch, state, kwargs, self._tokenreduce_chunk, self._tokenreduce_tile, scale)
            if unmerge:
                # the cache holds every patch's key and value: decode steps continue the full prompt as is
                thread = _thread(patch)
                thread.unmerging = _unmerging(self, state, compaction, full, thread.record)
                try:
                    return super().forward(**kwargs)  # type: ignore[misc]
                finally:
                    thread.unmerging = None
            if inside is not None:
                out = adapter.pruned_prefill(
                    self, patch, state, compaction, kwargs, lambda: super(CompactingLLM, self).forward(**kwargs)
                )
            else:
                out = super().forward(**kwargs)  # type: ignore[misc]
            if out.cache is not None and compaction is not None:
                setattr(out.cache, COMPACTION, compaction)
            return out
        compaction: Compaction | None = getattr(cache, COMPACTION, None) if cache is not None else None
        if compaction is not None:
            _decode_step(compaction, cache, kwargs)
        return super().forward(**kwargs)  # type: ignore[misc]

    def _deepstack_process(self, hidden_states: Tensor, visual_pos_masks: Tensor, visual_embeds: Tensor) -> Tensor:
        # Qwen3-VL adds deepstack features to the first layers' visual tokens: after a pruning layer,
        # to the kept ones.
        run = _thread(getattr(self, ATTR)).llm
        if run is not None and run.stages:
            visual_pos_masks, visual_embeds = hf_llm.deepstack_inputs(run, visual_pos_masks, visual_embeds)
        return super()._deepstack_process(hidden_states, visual_pos_masks, visual_embeds)  # type: ignore[misc]


def _unmerging(text: nn.Module, state: VisualState, compaction: Compaction, full: dict, record: VLMRecord) -> Unmerging:
    """The full prompt's view of a compacted one for virtual unmerging: where each place's merged token
    is, and the position ids, rotary tables and mask the LLM would have given the full prompt."""
    embeds = full["inputs_embeds"]
    spans = image_spans(state.placeholder, text._tokenreduce_chunk)
    index = expansion_index(compaction, spans, [image.owner for image in record.images])
    positions = full.get("position_ids")
    if positions is None:  # what the LLM itself would count for the full prompt
        positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
    mask = sys.modules[original_class(text).__module__].create_causal_mask(
        config=text.config, inputs_embeds=embeds, attention_mask=full.get("attention_mask"), cache=None, position_ids=positions
    )
    return Unmerging(index, compaction.mask.shape[1], positions, text.rotary_emb(embeds, position_ids=positions), mask)


@loadable
class UnmergingAttention:
    """Mixed in front of each self-attention module of the LLM for virtual token unmerging (DyMU): at
    an unmerging prefill, the module runs on the merged tokens spread over the full prompt (with its
    positions and mask), and each merged token's output is the mean over its places."""

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        run = _thread(getattr(self, ATTR)).unmerging
        if run is None:
            return super().forward(hidden_states, *args, **kwargs)  # type: ignore[misc]
        if args:
            raise TypeError("virtual unmerging calls attention with keyword arguments only")
        kwargs.update(position_embeddings=run.position_embeddings, attention_mask=run.mask)
        if "position_ids" in kwargs:
            kwargs["position_ids"] = run.position_ids
        out, weights = super().forward(expand_tokens(hidden_states, run.index), **kwargs)  # type: ignore[misc]
        return merge_mean(out, run.index, run.length), weights


def _decode_step(compaction: Compaction, cache, kwargs: dict) -> None:
    """Carry a decode step after a compacted prompt: the mask ``generate`` grew from the full prompt is
    shortened to the cache's length, and reindexed positions move back by what each row lost."""
    embeds = kwargs["inputs_embeds"]
    q, cached = embeds.shape[1], cache.get_seq_length()
    full_length = compaction.length + cached - compaction.mask.shape[1] + q
    mask = kwargs.get("attention_mask")
    if isinstance(mask, dict):  # 4-D masks per attention type (Gemma3), built over the full prompt
        kwargs["attention_mask"] = {k: None if v is None else _decode_4d(compaction, v, full_length) for k, v in mask.items()}
    elif mask is not None and mask.dim() == 4:
        kwargs["attention_mask"] = _decode_4d(compaction, mask, full_length)
    elif mask is not None:
        if mask.shape[1] == full_length:
            kwargs["attention_mask"] = compaction.decode_mask(mask)
        elif mask.shape[1] != cached + q:
            raise ValueError(
                f"attention_mask has {mask.shape[1]} columns; expected {full_length} (the full prompt) or {cached + q}"
            )
    positions = kwargs.get("position_ids")
    if positions is None:  # what the LLM itself would count after the full prompt
        positions = (torch.arange(q, device=embeds.device) + full_length - q).expand(embeds.shape[0], -1)
    kwargs["position_ids"] = compaction.decode_positions(positions)


def _decode_4d(compaction: Compaction, mask: Tensor, full_length: int) -> Tensor:
    return compaction.decode_columns(mask) if mask.shape[-1] == full_length else mask


@register_adapter
class HFVLM(Adapter):
    name = "hf-vlm"
    family = f"Hugging Face VLMs ({FAMILY_NAMES})"
    stages: ClassVar[tuple[Stage, ...]] = (Stage.ENCODER, Stage.PRE_LLM, Stage.LLM)
    tower = HFVisionTower()

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _family(model) is not None

    # -- parts --------------------------------------------------------------------------------
    def spec(self, model: nn.Module) -> Family:
        family = _family(model)
        assert family is not None
        return family

    def _supported_tower(self, model: nn.Module) -> nn.Module | None:
        vision = getattr(model, self.spec(model).vision)
        return vision if HFVisionTower.matches(vision) else None

    def vision(self, model: nn.Module, why: str) -> nn.Module:
        """The vision tower, for methods that act in it or on its hidden states (``why`` names them)."""
        vision = self._supported_tower(model)
        spec = self.spec(model)
        if vision is None or spec.projector is None:
            part = "vision tower" if vision is None else "projector (it pools, shuffles pixels or packs crops)"
            raise TypeError(
                f"{why} cannot run in {type(model).__name__}: its {part} is not one tokenreduce can follow; "
                "pre-LLM methods that select among the projected tokens (divprune, random, pool) work"
            )
        return vision

    def feature_layer(self, model: nn.Module, vision: nn.Module) -> int:
        """0-based index of the vision layer whose output the VLM reads (``-1``: the embeddings)."""
        layer = model.config.vision_feature_layer
        if not isinstance(layer, int):
            raise TypeError(f"vision_feature_layer={layer!r}: token reduction needs the features of one vision layer")
        depth = len(self.tower.blocks(vision))
        return depth + layer if layer < 0 else layer - 1

    def tower_geometry(self, model: nn.Module, vision: nn.Module) -> tuple[int, tuple[int, int] | None, int]:
        """``(visual tokens per image in the prompt, their grid or None, class tokens of the tower)``."""
        n0 = self.tower.default_num_tokens(vision)
        prefix = self.tower.num_prefix_tokens(vision)
        if model.config.vision_feature_select_strategy == "default" and prefix:
            return n0 - prefix, _square(n0 - prefix), prefix
        return n0, (_square(n0) if not prefix else None), prefix

    def tile_tokens(self, model: nn.Module) -> int | None:
        """Visual tokens of one square tile, when the family has a fixed one."""
        tile = self.spec(model).tile
        if tile == "tower":
            vision = self._supported_tower(model)
            return None if vision is None else self.tower_geometry(model, vision)[0]
        return None if tile is None else int(getattr(model, tile, None) or getattr(model.config, tile))

    def grids(self, model: nn.Module, image_grid_thw: Tensor | None) -> list[tuple[int, int] | None]:
        """Per image, the grid of its visual tokens as the inputs give it (Qwen's ``image_grid_thw``)."""
        merge = self.spec(model).merge
        if image_grid_thw is None or merge is None:
            return []
        m = int(_config_path(model.config, merge))
        return [(int(h) // m, int(w) // m) if int(t) == 1 else None for t, h, w in image_grid_thw.tolist()]

    def video_layouts(self, model: nn.Module, patch: Patch, kwargs: dict) -> tuple[list[VideoLayout], int]:
        """Per video of a forward's inputs ``kwargs``, its tokens' layout at the LLM's input, and the tokens
        that follow each video's frames in its span: Qwen2/2.5-VL, ``video_grid_thw`` (t, h, w) merged by
        the patch merger to ``t`` frames of ``(h / m, w / m)`` tokens (``generate``: the grid its video
        encoding recorded), none after; LLaVA-OneVision, the frames of ``pixel_values_videos [videos,
        frames, C, H, W]`` (or of the encoded videos' token counts) pooled 2x2 (``apply_pooling``: ceil
        of half the tower's patch grid), one newline token after."""
        if self.spec(model).video == "thw":
            thread = _thread(patch)
            thw = kwargs.get("video_grid_thw")
            thw, thread.video_grid = (thread.video_grid if thw is None else thw), None
            if thw is None:
                raise ValueError(f"{type(model).__name__} needs video_grid_thw to lay out its videos")
            m = int(_config_path(model.config, self.spec(model).merge))
            return [VideoLayout(int(t), (int(h) // m, int(w) // m)) for t, h, w in thw.tolist()], 0
        vision = model.config.vision_config
        side = math.ceil(vision.image_size // vision.patch_size / 2)
        pixels = kwargs.get("pixel_values_videos")
        if pixels is not None:
            frames = [int(pixels.shape[1])] * int(pixels.shape[0])
        else:
            frames = [(int(v.shape[0]) - 1) // (side * side) for v in kwargs["mm_encoder_outputs"]["video"].pooler_output]
        return [VideoLayout(f, (side, side)) for f in frames], 1

    def example_images(self, model: nn.Module, count: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Random pixel inputs for ``count`` images of the tower's native size, laid out as the
        family's processor lays them out (AnyRes: a 2x2 crop grid and the base image; Qwen: a 24x24
        patch grid, flattened patches)."""
        spec, config = self.spec(model), model.config
        vision = config.vision_config
        if spec.merge is not None:
            p, tp = vision.patch_size, vision.temporal_patch_size
            rows = torch.randn(count * 24 * 24, vision.in_channels * tp * p * p, generator=generator)
            return dict(pixel_values=rows, image_grid_thw=torch.tensor([[1, 24, 24]] * count))
        side = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
        if spec.anyres:
            size = [2 * side, 2 * side]
            module = sys.modules[original_class(model).__module__]
            crops = module.image_size_to_num_patches(size, config.image_grid_pinpoints, side)
            pixels = torch.randn(count, crops, 3, side, side, generator=generator)
            return dict(pixel_values=pixels, image_sizes=torch.tensor([size] * count))
        pixels = torch.randn(count, 3, side, side, generator=generator)
        return dict(pixel_values=pixels[:, None] if spec.tiles else pixels)

    def example_inputs(
        self, model: nn.Module, batch_size: int, prompt_tokens: int, seed: int = 0, video_frames: int = 0
    ) -> dict[str, Tensor]:
        """A batch of prompts of one random image and ``prompt_tokens`` random text tokens each (half
        before the image, half after), framed and typed as the family's processor does. With
        ``video_frames`` (LLaVA-OneVision), a video of that many frames of the tower's size instead."""
        spec, config = self.spec(model), model.config
        gen = torch.Generator().manual_seed(seed)
        if video_frames:
            if spec.video != "frames":
                raise ValueError(f"example video prompts are built for LLaVA-OneVision, not {type(model).__name__}")
            side = config.vision_config.image_size
            images = dict(pixel_values_videos=torch.randn(batch_size, video_frames, 3, side, side, generator=gen))
            with torch.no_grad():
                features = original_class(model).get_video_features(model, images["pixel_values_videos"][:1])
            tokens = int(features.pooler_output.shape[1])
        else:
            images = self.example_images(model, batch_size, gen)
            one = {k: v[: v.shape[0] // batch_size] for k, v in images.items()}
            with torch.no_grad():
                tokens = self.get_image_features_count(model, one)
        image_id = int(config.video_token_id if video_frames else getattr(config, spec.image_token))
        frame = [int(getattr(config, a)) for a in spec.frame] if spec.frame else []
        special = {image_id, *frame, *(int(v) for k, v in vars(config).items() if k.endswith("token_id") and isinstance(v, int))}
        vocab = config.get_text_config().vocab_size
        text = torch.randint(3, min(vocab, 32000), (batch_size, prompt_tokens), generator=gen)
        text = text.masked_fill(torch.isin(text, torch.tensor(sorted(special))), 3)
        image = torch.tensor(frame[:1] + [image_id] * tokens + frame[1:]).expand(batch_size, -1)
        before = prompt_tokens // 2
        ids = torch.cat([text[:, :before], image, text[:, before:]], dim=1)
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), **images)
        if spec.type_ids:
            inputs[spec.type_ids] = (ids == image_id).long()
        return inputs

    @staticmethod
    def get_image_features_count(model: nn.Module, images: dict[str, Tensor]) -> int:
        """Visual tokens the model gives the first image of ``images`` (its own feature computation)."""
        return int(original_class(model).get_image_features(model, **images).pooler_output[0].shape[0])

    # -- the encoder stage delegates to the tower -----------------------------------------------
    def num_prefix_tokens(self, model: nn.Module) -> int:
        vision = self._supported_tower(model)
        return 0 if vision is None else self.tower.num_prefix_tokens(vision)

    def has_cls_token(self, model: nn.Module) -> bool:
        vision = self._supported_tower(model)
        return vision is not None and self.tower.has_cls_token(vision)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        vision = self._supported_tower(model)
        return [] if vision is None else self.tower.blocks(vision)

    def default_num_tokens(self, model: nn.Module) -> int | None:
        vision = self._supported_tower(model)
        return None if vision is None else self.tower.default_num_tokens(vision)

    def block_costs(self, model: nn.Module) -> list[BlockCost]:
        vision = self._supported_tower(model)
        return [] if vision is None else self.tower.block_costs(vision)

    def stem_head_macs(self, model: nn.Module, num_tokens: int) -> int:
        vision = self._supported_tower(model)
        return 0 if vision is None else self.tower.stem_head_macs(vision, num_tokens)

    def summary(self, model: nn.Module) -> str:
        vision = self._supported_tower(model)
        spec = self.spec(model)
        tower = self.tower.summary(vision) if vision is not None else type(getattr(model, spec.vision)).__name__
        text = getattr(model, spec.text)
        return (
            f"{original_class(model).__name__}: vision {tower}; "
            f"LLM {original_class(text).__name__} ({model.config.get_text_config()._attn_implementation})"
        )

    # -- checks and installation --------------------------------------------------------------
    def validate(self, model: nn.Module, method: Method) -> None:
        if isinstance(method, CrossAttentionMethod):
            raise TypeError(
                f"method {method.name!r} trims the image features that cross-attention layers read (Llama 3.2 Vision, "
                f"MllamaForConditionalGeneration); {type(model).__name__} has its visual tokens in the LLM's sequence"
            )
        before, inside = parts(method)
        for part in (before, inside):
            self._validate_modalities(model, part)
        if inside is not None:
            self._validate_llm(model, inside)
        if before is not None:
            self._validate_before(model, before)

    def _validate_modalities(self, model: nn.Module, method: Method | None) -> None:
        """A part acting on videos alone needs a family whose videos tokenreduce routes; a pre-LLM part
        acting on videos selects among their projected tokens."""
        acts = _modalities(method)
        if "video" not in acts:
            return
        if "image" not in acts and self.spec(model).video is None:
            raise TypeError(
                f"{method.name!r} acts on videos, and {type(model).__name__} has no video input tokenreduce routes: "
                f"use one of {VIDEO_FAMILY_NAMES}"
            )
        if isinstance(method, VisualMethod) and method.space != "projected":
            raise TypeError(f"{method.name!r} acts on videos, which tokenreduce gives only to projected-space pre-LLM methods")

    def _validate_before(self, model: nn.Module, method: Method) -> None:
        if isinstance(method, EncoderMethod):
            if method.variable_counts and self.spec(model).anyres:
                raise TypeError(
                    f"method {method.name!r} leaves each crop its own token count, which {type(model).__name__}'s AnyRes "
                    "packing cannot follow; use a VLM with one span per image (LLaVA)"
                )
            if method.unmerges_in_llm:
                self._validate_unmerging(model, method)
            vision = self.vision(model, f"encoder-stage method {method.name!r}")
            self.tower.validate(vision, method)
            self.feature_layer(model, vision)
            return
        assert isinstance(method, VisualMethod)
        if method.needs_text and method.space != "projected":
            raise TypeError(f"{method.name!r} reads the prompt's text, which tokenreduce gives only to projected-space methods")
        if method.needs_cls_attention:
            self._validate_cls_attention(model, method)
        if method.needs_projector and (method.space != "vision" or self.spec(model).merge is not None):
            raise TypeError(
                f"{method.name!r} runs the VLM's projector on vision features, which tokenreduce gives only to "
                f"vision-space methods of VLMs with a token-wise projector (LLaVA family), not {type(model).__name__}"
            )
        if method.positions == "reindex" and self.spec(model).mrope:
            raise ValueError(
                f"positions='reindex' cannot apply to {type(model).__name__}: its position ids encode the image grid"
            )
        if method.space == "vision" and self.spec(model).merge is not None:
            pass  # Qwen: the last vision block's output, before the patch merger
        elif method.space == "vision":
            vision = self.vision(model, f"{method.name!r}, which selects among the vision encoder's hidden states,")
            self.feature_layer(model, vision)
            tokens, grid, _ = self.tower_geometry(model, vision)
            method.num_kept(tokens, grid)
        tile = self.tile_tokens(model)
        if tile is not None:
            method.num_kept(tile, _square(tile))

    def _validate_unmerging(self, model: nn.Module, method: Method) -> None:
        """Virtual unmerging reruns each attention module on the full prompt under one causal mask:
        every layer must use full attention with 1-D position ids."""
        text = getattr(model, self.spec(model).text)
        types = set(getattr(text.config, "layer_types", None) or ["full_attention"])
        if self.spec(model).mrope or types != {"full_attention"} or not hasattr(text, "rotary_emb"):
            raise TypeError(
                f"{method.name!r} with unmerge=True needs an LLM whose layers all use full attention with rotary "
                f"position ids (Llama, Qwen2), not {type(text).__name__} with layer types {sorted(types)}; "
                "pass unmerge=False"
            )
        if not all(hasattr(layer, "self_attn") for layer in text.layers):
            raise TypeError(f"{method.name!r} with unmerge=True needs decoder layers with a self_attn module")

    def _validate_cls_attention(self, model: nn.Module, method: VisualMethod) -> None:
        """A projected-space method reading the class token's attention needs a tower with one whose
        images each fill one span of the prompt (LLaVA's token-wise projector), or, when it reads AnyRes
        spans, an AnyRes family that packs the patches of such a tower without its class token."""
        vision = self.vision(model, f"{method.name!r}, which reads the vision encoder's class-token attention,")
        if method.needs_anyres:  # the packed spans hold patches only: the class token is dropped
            strategy = getattr(model.config, "vision_feature_select_strategy", "default")
            anyres = self.spec(model).anyres and method.space == "projected"
            if not anyres or not self.tower.has_cls_token(vision) or strategy != "default":
                raise TypeError(
                    f"{method.name!r} reads the class-token attention of an AnyRes VLM's base image and crops: it needs "
                    "LLaVA-NeXT or LLaVA-OneVision with a vision tower that has a class token, which the VLM drops "
                    f"(vision_feature_select_strategy='default'), not {type(model).__name__} with {type(vision).__name__} "
                    f"and {strategy!r}"
                )
            self.feature_layer(model, vision)
            return
        if method.space != "projected" or self.spec(model).tile != "tower" or not self.tower.has_cls_token(vision):
            raise TypeError(
                f"{method.name!r} reads the class token's attention of the vision layer {type(model).__name__} reads: "
                "it needs a vision tower with a class token and one prompt span per image (LLaVA)"
            )
        self.feature_layer(model, vision)

    def _validate_llm(self, model: nn.Module, method: LLMMethod) -> None:
        spec, text = self.spec(model), getattr(model, self.spec(model).text)
        if method.prune_layers(len(text.layers)) and method.decode_layer(len(text.layers)) is not None:
            raise TypeError(f"{method.name!r}: an in-LLM method prunes at the prefill or selects cache entries when decoding")
        if method.positions == "reindex" and spec.mrope:
            raise ValueError(
                f"positions='reindex' cannot apply to {type(model).__name__}: its position ids encode the image grid"
            )
        parts = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.head_dim")
        if not hasattr(text, "rotary_emb") or not all(_has(layer, p) for layer in text.layers for p in parts):
            raise TypeError(f"{type(text).__name__} has no rotary_emb or decoder layers tokenreduce can follow ({parts})")

    def plan(self, model: nn.Module, method: Method) -> list[str]:
        before, inside = parts(method)
        lines = [] if before is None else self._plan(model, before)
        if "video" in _modalities(before):
            lines.append("visual tokens per video into the LLM: as the method's budget gives for each video's frames and grid")
        if inside is not None:
            depth = len(getattr(model, self.spec(model).text).layers)
            layers, decode = inside.prune_layers(depth), inside.decode_layer(depth)
            spans = " and ".join(sorted(inside.modalities, reverse=True))
            if decode is not None:
                lines.append(
                    f"decode steps: LLM layers {decode}..{depth - 1} of {depth} attend to a selection of each {spans}'s "
                    f"cached tokens, chosen from layer {decode - 1}'s attention (the cache keeps every entry)"
                )
                return lines
            tile = self.tile_tokens(model)
            if tile is not None and before is not None:
                tile = before.num_kept(tile, _square(tile))
            counts = [] if tile is None else [tile] + [inside.kept(tile, j) for j in range(len(layers))]
            counts = ": " + " -> ".join(map(str, counts)) if counts else ""
            back = "".join(f"; layer {a}'s input comes back before layer {b}" for a, b in inside.restore_layers(depth).items())
            where = ", ".join(map(str, layers))
            if inside.masks_only:  # the others stay in the sequence and the cache
                back += "; the others are masked, not removed (no compute saved)"
            lines.append(f"visual tokens per image, pruned before LLM layers {where} of {depth}{counts}{back}")
        return lines

    def _plan(self, model: nn.Module, method: Method) -> list[str]:
        if "image" not in _modalities(method):
            return []
        if isinstance(method, EncoderMethod):
            lines = self.tower.plan(self.vision(model, method.name), method)
            if method.unmerges_in_llm:
                depth = len(getattr(model, self.spec(model).text).layers)
                lines.append(f"virtual token unmerging in all {depth} LLM attention layers: attention over every patch")
            return lines
        if method.space == "vision" and self.spec(model).anyres:
            tokens, grid, _ = self.tower_geometry(model, self.vision(model, method.name))
            return [f"visual tokens per crop (the base image and each AnyRes crop): {tokens} -> {method.num_kept(tokens, grid)}"]
        tile = self.tile_tokens(model)
        if tile is None:
            return ["visual tokens per image into the LLM: as the method's budget gives for each image's size"]
        kept = method.num_kept(tile, _square(tile))
        return [f"visual tokens per image into the LLM: {tile} -> {kept}"]

    def install(self, model: nn.Module, patch: Patch) -> None:
        spec = self.spec(model)
        method, inside = parts(patch.method)
        vision_space = isinstance(method, VisualMethod) and method.space == "vision"
        if vision_space and spec.merge is not None:
            visual = getattr(model, spec.vision)
            merger, attention = visual.merger, visual.blocks[-1].attn
            patch.set_attr(merger, ATTR, patch)
            patch.set_attr(merger, "_tokenreduce_group", visual.spatial_merge_size**2)
            width = [m for m in merger.modules() if isinstance(m, nn.Linear)][-1].out_features
            patch.set_attr(merger, "_tokenreduce_width", width)
            patch.swap_class(merger, DeferredMerger)
            patch.set_attr(attention, ATTR, patch)
            patch.swap_class(attention, CaptureAttentionInput)
            patch.swap_class(model, MergingVLMModel)
        elif isinstance(method, VisualMethod) and method.needs_cls_attention:
            vision = self.vision(model, method.name)
            self._capture_qk(vision, self.feature_layer(model, vision), patch, getattr(model, spec.text))
            if method.needs_anyres:
                patch.swap_class(model, TracingVLMModel)
        elif isinstance(method, EncoderMethod) or vision_space:
            vision = self.vision(model, method.name)
            projector = getattr(model, spec.projector)
            layer_index = self.feature_layer(model, vision)
            if isinstance(method, EncoderMethod):
                patch.set_attr(vision, ATTR, patch)
                self.tower.install(vision, patch)
            else:
                patch.capture(self.tower.blocks(vision)[layer_index], "hidden", mixin=CaptureVision)
                if method.needs_attention:
                    self._capture_qk(vision, layer_index, patch, projector)
                shallow = method.shallow_layer(len(self.tower.blocks(vision)))
                separate = shallow is not None and shallow != layer_index
                if separate:
                    layout = TOWERS[next(n for n in class_names(vision) if n in TOWERS)].layout
                    second = self.tower.blocks(vision)[shallow]
                    heads = int(getattr(getattr(second, layout.attention), layout.heads))
                    patch.capture(second.get_submodule(layout.query), "shallow_q", heads, mixin=CaptureVision)
                    patch.capture(second.get_submodule(layout.key), "shallow_k", heads, mixin=CaptureVision)
                patch.set_attr(projector, "_tokenreduce_shallow", separate)
            patch.set_attr(projector, ATTR, patch)
            patch.set_attr(projector, "_tokenreduce_geometry", self.tower_geometry(model, vision))
            patch.set_attr(projector, "_tokenreduce_layer", layer_index)
            patch.swap_class(projector, ReducingProjector)
            if spec.anyres:
                patch.swap_class(model, PackingVLMModel)
        text = getattr(model, spec.text)
        if inside is not None:
            hf_llm.install(patch, text, inside)
        if method is not None and method.unmerges_in_llm:
            for layer in text.layers:
                patch.set_attr(layer.self_attn, ATTR, patch)
                patch.swap_class(layer.self_attn, UnmergingAttention)
        patch.set_attr(text, ATTR, patch)
        tile = self.tile_tokens(model)
        patch.set_attr(text, "_tokenreduce_chunk", tile if spec.tile == "tower" else None)  # every image has `tile` tokens
        patch.set_attr(text, "_tokenreduce_tile", tile)
        patch.swap_class(text, CompactingLLM)
        if not isinstance(model, VLMModel):
            videos = spec.video == "thw" and any("video" in _modalities(m) for m in (method, inside))
            patch.swap_class(model, GridVLMModel if videos else VLMModel)

    def _capture_qk(self, vision: nn.Module, layer_index: int, patch: Patch, holder: nn.Module) -> None:
        """Store the queries and keys of vision layer ``layer_index`` in the thread on every vision
        forward; ``holder`` gets the layer's attention scale (``_tokenreduce_scale``)."""
        layer = self.tower.blocks(vision)[layer_index]
        layout = TOWERS[next(n for n in class_names(vision) if n in TOWERS)].layout
        attention = getattr(layer, layout.attention)
        heads = int(getattr(attention, layout.heads))
        patch.capture(layer.get_submodule(layout.query), "q", heads, mixin=CaptureVision)
        patch.capture(layer.get_submodule(layout.key), "k", heads, mixin=CaptureVision)
        patch.set_attr(holder, "_tokenreduce_scale", float(getattr(attention, layout.scale)))

    # -- running ------------------------------------------------------------------------------
    def reindex(self, model: nn.Module, method: Method | None) -> bool:
        """Whether tokens ``method`` keeps get consecutive position ids (see :class:`VisualMethod`)."""
        if method is None or method.unmerges_in_llm:  # virtual unmerging reads the full prompt's positions
            return False
        positions = getattr(method, "positions", "auto")
        return positions == "reindex" or (positions == "auto" and not self.spec(model).mrope)

    def project_reduced(self, projector: nn.Module, patch: Patch, x: Tensor, project) -> Tensor:
        """Project ``x`` (the encoder's features as the VLM selected them) reduced per image, with each
        image's kept tokens at the front of a full-length span."""
        tokens, grid, prefix = projector._tokenreduce_geometry
        thread = _thread(patch)
        method = parts(patch.method)[0]
        if isinstance(method, EncoderMethod):
            encoder = patch.current()
            layer = projector._tokenreduce_layer
            owner, kept = encoder.owners(after=layer), encoder.tokens_after(layer)
            if x.shape[1] == kept - prefix:  # the VLM dropped the class token, which stays first
                owner = torch.where(owner[:, prefix:] >= prefix, owner[:, prefix:] - prefix, -1)
                kept -= prefix
            images, encoder_record = _records_from_owner(owner, kept, grid, method.variable_counts), encoder.record()
            out = project(x)
            rank = torch.full(out.shape[:2], IN_PLACE, dtype=torch.long, device=x.device)
        else:
            hidden, q, k = thread.hidden, thread.q, thread.k
            if hidden is None or (method.needs_attention and (q is None or k is None)):
                raise RuntimeError("the vision layer the VLM reads did not run before its projector")
            scale = getattr(projector, "_tokenreduce_scale", None)
            ctx = VisualContext(hidden, method.num_kept(tokens, grid), prefix, grid, q, k, scale)
            if projector._tokenreduce_shallow:
                if thread.shallow_q is None or thread.shallow_k is None:
                    raise RuntimeError("the second vision layer the method reads did not run before the projector")
                ctx.shallow_q, ctx.shallow_k = thread.shallow_q, thread.shallow_k
            else:  # the method reads one layer, or its second is the one the VLM reads
                ctx.shallow_q, ctx.shallow_k = q, k
            if method.needs_projector:
                ctx.project = project
            selection = method.select(ctx)
            thread.hidden = thread.q = thread.k = thread.shallow_q = thread.shallow_k = None
            images, encoder_record = _records(selection, prefix, tokens, grid), None
            out = project(selection.apply(hidden))
            rank = torch.where(selection.index < prefix, CLASS_TOKEN, IN_PLACE)
            rank[:, out.shape[1] - method.summary_outputs(out.shape[1]) :] = SUMMARY
        padded = _front(out, tokens)
        thread.reduced = ReducedImages(padded, images, encoder_record, out, rank)
        return padded

    def merge_reduced(self, model: nn.Module, patch: Patch, grid_thw: Tensor, out):
        """Qwen: reduce ``out``, the output of ``get_image_features`` whose merger deferred, per image.

        A token is a group of ``spatial_merge_size**2`` patches (consecutive in the tower, row-major
        groups after undoing Qwen2.5's window order); the method selects among the groups' concatenated
        patch states of the last vision block, with that block's queries and keys (rotary applied) for
        the groups' patches; the merger projects the kept tokens only, written to the front of each
        image's span; Qwen3-VL's deepstack features follow the same selection."""
        thread, method = _thread(patch), parts(patch.method)[0]
        x, attention = thread.hidden, thread.attention
        thread.hidden = thread.attention = None
        if x is None or attention is None:
            raise RuntimeError("Qwen's vision tower did not run its last block and merger for these images")
        visual = getattr(model, self.spec(model).vision)
        attn, merger = visual.blocks[-1].attn, visual.merger
        merge = visual.spatial_merge_size
        group = merge * merge
        hidden_in, cos, sin = attention
        q, k, _ = attn.qkv(hidden_in).reshape(hidden_in.shape[0], 3, attn.num_heads, -1).unbind(1)
        q, k = sys.modules[original_class(attn).__module__].apply_rotary_pos_emb_vision(q, k, cos, sin)
        order = self._unit_order(visual, grid_thw)

        def row_major(t: Tensor) -> Tensor:
            t = t.reshape(t.shape[0] // group, group, *t.shape[1:])
            return t if order is None else t[order]

        x, q, k = row_major(x), row_major(q), row_major(k)  # [U, group, C], [U, group, H, d]
        sizes = (grid_thw.prod(-1) // group).tolist()
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        grids = [(int(h) // merge, int(w) // merge) if int(t) == 1 else None for t, h, w in grid_thw.tolist()]
        pooled = torch.zeros_like(torch.cat(out.pooler_output))
        levels = [torch.cat(level) for level in getattr(out, "deepstack_features", None) or []]
        reduced_levels = [torch.zeros_like(level) for level in levels]
        records: list[ImageRecord | None] = [None] * len(sizes)
        batches: dict[tuple, list[int]] = {}
        for i, (n, grid) in enumerate(zip(sizes, grids)):
            batches.setdefault((n, grid), []).append(i)
        for (n, grid), members in batches.items():
            keep = method.num_kept(n, grid)
            spans = [slice(offsets[i], offsets[i] + n) for i in members]
            features = torch.stack([x[sp].flatten(1) for sp in spans])
            heads = [torch.stack([t[sp].flatten(0, 1) for sp in spans]).transpose(1, 2) for t in (q, k)]
            selection = method.select(VisualContext(features, keep, 0, grid, *heads, attn.scaling, group=group))
            kept = selection.apply(features).reshape(-1, x.shape[-1])
            merged = original_class(merger).forward(merger, kept).view(len(members), keep, -1)
            chosen = [merged] + [selection.apply(torch.stack([level[sp] for sp in spans])) for level in levels]
            for target, tokens in zip([pooled, *reduced_levels], chosen):
                for j, sp in enumerate(spans):
                    target[sp.start : sp.start + keep] = tokens[j]
            for j, record in zip(members, _records(selection, 0, n, grid)):
                records[j] = record
        out.pooler_output = tuple(torch.split(pooled, sizes))
        if levels:
            out.deepstack_features = [tuple(torch.split(level, sizes)) for level in reduced_levels]
        thread.reduced = ReducedImages(pooled, records, None)  # type: ignore[arg-type]
        return out

    @staticmethod
    def _unit_order(visual: nn.Module, grid_thw: Tensor) -> Tensor | None:
        """Where each row-major merged token sits in the tower's order (Qwen2.5 reorders by window)."""
        if not hasattr(visual, "fullatt_block_indexes"):
            return None
        window_index, _ = sys.modules[original_class(visual).__module__].get_vision_window_index(
            grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size, patch_size=visual.patch_size
        )
        return torch.argsort(window_index).to(grid_thw.device)

    def pack_reduced(self, model: nn.Module, patch: Patch, features: list[Tensor], image_sizes, pack) -> tuple:
        """Pack each image's reduced crops (``features``: per image ``[crops, N, D]``, as the projector
        returned them) into one span: the kept tokens of the base image in their order, then those of
        the AnyRes crops: tokens in place in the image's row-major order over all crops, then class
        tokens, then summaries, with no newline tokens (VisionZip's ``restore_image_features_sorted``),
        zero-padded to the span length the model's own packing gives the image (``pack(features,
        newline)`` runs it). Each image's record maps every packed placeholder to the kept token
        covering it; a kept token takes the position of the first placeholder it covers."""
        thread = _thread(patch)
        reduced = thread.reduced
        assert reduced is not None and reduced.kept is not None and reduced.rank is not None
        n = features[0].shape[1]
        side = int(round(n**0.5))
        if side * side != n:
            raise TypeError(f"AnyRes packing needs square crops; this tower gives {n} tokens per crop")
        grid_shape = sys.modules[original_class(model).__module__].get_anyres_image_grid_shape
        counts = [f.shape[0] for f in features]
        shapes = [
            grid_shape(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size) if c > 1 else (1, 1)
            for size, c in zip(image_sizes, counts)
        ]
        # The model's packing run on each patch's (row, column) in its image's crop grid traces where
        # every patch lands (unpadding crops, OneVision's downscaling interpolates: nearest patch).
        coords = [_crop_coordinates(c, side, cols) for c, (_, cols) in zip(counts, shapes)]
        packed, _ = pack(coords, torch.tensor([-1.0, -1.0], dtype=torch.float64))
        k = reduced.kept.shape[1]
        spans, records, lengths, offset = [], [], [], 0
        for c, (rows, cols), where in zip(counts, shapes, packed):
            crops = reduced.images[offset : offset + c]
            kept, rank = reduced.kept[offset : offset + c], reduced.rank[offset : offset + c]
            offset += c
            order = _packing_order(rank, torch.stack([r.position for r in crops]).cpu(), side, rows, cols)
            total, length = c * k, where.shape[0]
            if total > length:
                raise ValueError(
                    f"{patch.method.name!r} keeps {k} tokens for each of an image's {c} crops ({total} in all), "
                    f"more than the {length} tokens of its prompt span; lower the budget"
                )
            slot = torch.empty(total, dtype=torch.long)
            slot[order] = torch.arange(total)
            owner = _packed_owner(where, torch.stack([r.owner for r in crops]).cpu(), slot.view(c, k), side, cols)
            first = first_inputs(owner[None], total)[0]
            position = torch.where(first < length, first, 0)
            device = reduced.kept.device
            spans.append(_front(kept.reshape(1, total, -1)[:, order.to(device)], length)[0])
            records.append(ImageRecord(length, total, owner.to(device), position.to(device), None))
            lengths.append(length)
        thread.reduced = ReducedImages(torch.cat(spans), records, reduced.encoder)
        return spans, torch.tensor(lengths, dtype=torch.long, device=reduced.kept.device)

    def _select_spans(
        self,
        method: VisualMethod,
        state: VisualState,
        spans: list,
        tile: int | None,
        tensors: list[Tensor],
        cls: Tensor | list[Tensor] | None = None,
        layouts: list[AnyResLayout] | None = None,
    ) -> list[ImageRecord]:
        """Run a pre-LLM method on every image span of ``tensors[0]`` (the prompt's embeddings), images
        of equal size and grid together, writing each span's kept tokens to its front in every tensor of
        ``tensors`` (aligned per-token inputs such as Qwen3's deepstack features follow the same
        selection). ``cls [spans, N0]``: each image's class-token attention, for methods that read it
        (with ``layouts``, each AnyRes span's layout: per span ``[L]`` aligned with its tokens). Returns
        each image's record, in span order."""
        records: list[ImageRecord | None] = [None] * len(spans)
        text = text_mask = None
        if method.needs_text:  # the text tokens are never written below: read them once, before
            text, text_mask = _packed_text(tensors[0], state.text)
            paired, paired_mask = _paired_text(tensors[0], state.text, state.placeholder, spans)
        if layouts is not None and [int(lay.part.shape[0]) for lay in layouts] != [n for _, _, n in spans]:
            raise ValueError(
                f"the prompt's image spans hold {[n for _, _, n in spans]} tokens, which the images' AnyRes packing "
                f"({[int(lay.part.shape[0]) for lay in layouts]}) does not match"
            )
        groups: dict[tuple, list[int]] = {}
        for i, (_, _, n) in enumerate(spans):
            key = _grid(state, i, n, tile) if layouts is None else _layout_key(layouts[i])
            groups.setdefault((n, key), []).append(i)
        for (n, grid), members in groups.items():
            layout = None if layouts is None else layouts[members[0]]
            keep = method.num_kept(n, grid) if layout is None else method.num_kept_anyres(layout)
            grid = grid if layout is None else None
            selection = None
            for tensor in tensors:
                features = torch.stack([tensor[spans[i][0], spans[i][1] : spans[i][1] + n] for i in members])
                if selection is None:
                    rows = [spans[i][0] for i in members]
                    prompt = {}
                    if text is not None:
                        prompt = dict(text=text[rows], text_mask=text_mask[rows], paired_text=paired[members])
                        prompt["paired_mask"] = paired_mask[members]
                    if layout is not None:
                        prompt["anyres"] = layout
                        if cls is not None:
                            prompt["cls_attention"] = torch.stack([cls[i] for i in members])
                    elif cls is not None:
                        prompt["cls_attention"] = cls[members, cls.shape[1] - n :]  # without the class token's own
                    selection = method.select(VisualContext(features, keep, 0, grid, **prompt))
                kept = selection.apply(features)
                for j, i in enumerate(members):
                    row, start, _ = spans[i]
                    tensor[row, start : start + keep] = kept[j]
            for j, record in zip(members, _records(selection, 0, n, grid)):
                records[j] = record
        return records  # type: ignore[return-value]

    def anyres_layouts(self, model: nn.Module, image_sizes) -> list[AnyResLayout]:
        """The layout of each image's packed span (see :class:`AnyResLayout`), traced by running the
        model's own ``pack_image_features`` on each patch's (row, column) (as :meth:`pack_reduced`)."""
        if image_sizes is None:
            raise ValueError(f"{type(model).__name__} needs image_sizes to lay out its AnyRes images")
        module = sys.modules[original_class(model).__module__]
        config, side_px = model.config, model.config.vision_config.image_size
        side = side_px // model.config.vision_config.patch_size
        sizes = [tuple(int(v) for v in size) for size in image_sizes.tolist()]
        counts = [module.image_size_to_num_patches(size, config.image_grid_pinpoints, side_px) for size in sizes]
        shapes = [module.get_anyres_image_grid_shape(size, config.image_grid_pinpoints, side_px) for size in sizes]
        coords = [_crop_coordinates(c, side, cols) for c, (_, cols) in zip(counts, shapes)]
        pack = original_class(model).pack_image_features
        newline = torch.tensor([-1.0, -1.0], dtype=torch.float64)
        if "vision_feature_select_strategy" in inspect.signature(pack).parameters:  # LLaVA-NeXT
            packed, _ = pack(model, coords, image_sizes, "default", image_newline=newline)
        else:  # OneVision
            ratio = getattr(config, "vision_aspect_ratio", "anyres_max_9")
            packed, _ = pack(model, coords, image_sizes, image_newline=newline, vision_aspect_ratio=ratio)
        layouts = []
        for where, (rows, cols), count in zip(packed, shapes, counts):
            t = torch.arange(where.shape[0])
            line = where[:, 0] < 0
            r, q = where[:, 0].round().long().clamp(min=0), where[:, 1].round().long().clamp(min=0)
            base = t < side * side
            part = torch.where(base, 0, 1 + r // side * cols + q // side).masked_fill(line, -1)
            row = torch.where(base, t // side, r).masked_fill(line, -1)
            col = torch.where(base, t % side, q).masked_fill(line, -1)
            layouts.append(AnyResLayout(part, row, col, (int(rows), int(cols)), side, int(count)))
        return layouts

    def _cls_attention(self, patch: Patch, images: int, scale: float) -> Tensor:
        """``[images, N0]``: the class token's attention at the vision layer the VLM reads, for the
        images of the prompt (the thread's last vision forward), in prompt order."""
        thread = _thread(patch)
        q, k = thread.q, thread.k
        thread.q = thread.k = None
        if q is None or k is None or q.shape[0] != images:
            raise RuntimeError(
                f"{patch.method.name!r} needs the vision encoder's attention for the {images} images of this prompt: "
                "compute their features with the patched model, in the thread that runs the prompt"
            )
        return cls_attention(q, k, scale)

    def compact_prompt(
        self, patch: Patch, state: VisualState, kwargs: dict, chunk: int | None, tile: int | None, scale: float | None = None
    ) -> Compaction:
        """Reduce the prompt's images and shorten the LLM's arguments ``kwargs`` to the kept visual
        tokens (embeddings, masks, position ids, per-visual-token inputs); record what was done. Image
        spans are runs of image tokens, cut in ``chunk``-token pieces when every image has that many;
        a span of ``tile`` tokens is a square grid; ``scale``: the attention scale of the vision layer
        whose class-token attention the method reads, when it reads it. Videos (when a part of the
        method acts on them) are reduced by a pre-LLM method that acts on videos, else pass whole."""
        embeds = kwargs["inputs_embeds"]
        method, thread = parts(patch.method)[0], _thread(patch)
        spans = image_spans(state.placeholder, chunk)
        if not spans or "image" not in _modalities(method):
            embeds = embeds.clone()
            images = [_whole(n, _grid(state, i, n, tile), device=embeds.device) for i, (_, _, n) in enumerate(spans)]
            encoder, deepstack = None, _deepstack(kwargs, embeds)
        elif isinstance(method, VisualMethod) and method.space == "projected":
            embeds = embeds.clone()
            deepstack = _deepstack(kwargs, embeds)
            cls, layouts = None, None
            if method.needs_anyres:
                layouts, thread.anyres = thread.anyres, None
                if layouts is None:
                    raise RuntimeError(f"{method.name!r}: the images of this prompt were not packed by this model in this thread")
            if method.needs_cls_attention and layouts is not None:
                crops = sum(layout.tower_images for layout in layouts)
                cls = _per_span_attention(self._cls_attention(patch, crops, scale), layouts)
            elif method.needs_cls_attention:
                cls = self._cls_attention(patch, len(spans), scale)
            images = self._select_spans(method, state, spans, tile, [embeds, *deepstack], cls, layouts)
            encoder = None
        else:
            spans_flat = embeds[state.placeholder]
            reduced = thread.reduced
            if reduced is None or not torch.equal(spans_flat, reduced.features.reshape(spans_flat.shape).to(spans_flat.dtype)):
                raise RuntimeError(
                    "the image features of this prompt were not reduced by this model in this thread "
                    "(compute them with the patched model, in the thread that runs the prompt)"
                )
            images, encoder, deepstack = reduced.images, reduced.encoder, _deepstack(kwargs, embeds)
        thread.reduced = None
        if len(images) != len(spans):
            raise ValueError(f"the prompt has {len(spans)} image token spans for {len(images)} images")
        videos, video_spans = [], []
        if state.video is not None:
            video_spans = state.video_spans()
            if "video" in _modalities(method):
                videos = self._select_videos(method, state, video_spans, embeds)
            else:
                videos = [_whole(n, lay.grid, lay.frames, embeds.device) for (_, _, n), lay in zip(video_spans, state.videos)]
        mask2d = state.prompt_mask(embeds)
        keeps = [
            SpanKeep(row, start, n, im.kept, im.position) for (row, start, n), im in zip(spans + video_spans, images + videos)
        ]
        compaction = compact(mask2d, keeps, state.reindex)
        _shorten(compaction, kwargs, embeds, deepstack)
        thread.record = VLMRecord(
            images=tuple(images),
            input_lengths=tuple(int(v) for v in mask2d.sum(1).tolist()),
            llm_lengths=tuple(int(v) for v in compaction.mask.sum(1).tolist()),
            positions="reindex" if state.reindex else "keep",
            encoder=encoder,
            videos=tuple(videos),
        )
        return compaction

    def _select_videos(self, method: VisualMethod, state: VisualState, spans: list, embeds: Tensor) -> list[ImageRecord]:
        """Run a pre-LLM video method on every video span of the prompt's embeddings ``embeds`` (written
        in place), videos of one layout together: each span's kept tokens go to its front, followed by
        the span's tail (OneVision's newline token, always kept, taking its own position). Returns each
        video's record, in prompt order."""
        records: list[ImageRecord | None] = [None] * len(spans)
        groups: dict[VideoLayout, list[int]] = {}
        for i, layout in enumerate(state.videos):
            groups.setdefault(layout, []).append(i)
        for layout, members in groups.items():
            n, keep = layout.tokens, method.num_kept_video(layout)
            if not 0 <= keep <= n:
                raise ValueError(
                    f"{method.name!r} keeps {keep} tokens of a video of {n} ({layout}); expected a count in [0, {n}]"
                )
            features = torch.stack([embeds[spans[i][0], spans[i][1] : spans[i][1] + n] for i in members])
            selection = method.select(VisualContext(features, keep, 0, layout.grid, video=layout))
            kept = selection.apply(features)
            tail = torch.arange(n, n + state.video_tail, device=embeds.device)
            for j, (i, record) in enumerate(zip(members, _records(selection, 0, n, layout.grid))):
                row, start, _ = spans[i]
                embeds[row, start + selection.num_out : start + selection.num_out + state.video_tail] = embeds[row, start + tail]
                embeds[row, start : start + selection.num_out] = kept[j]
                owner = torch.cat([record.owner, selection.num_out + tail - n])
                position = torch.cat([record.position, tail])
                records[i] = ImageRecord(
                    n + state.video_tail, selection.num_out + state.video_tail, owner, position, layout.grid, layout.frames
                )
        return records  # type: ignore[return-value]

    def pruned_prefill(self, text: nn.Module, patch: Patch, state: VisualState, before: Compaction | None, kwargs: dict, forward):
        """Run the LLM's prompt with an in-LLM method pruning its image (and, when it acts on them, video)
        tokens (see :mod:`hf_llm`); ``before``: how a pre-LLM method already shortened the prompt (its
        record is extended)."""
        hf_llm.check_cache(kwargs.get("cache"))
        embeds = kwargs["inputs_embeds"]
        inside, thread = parts(patch.method)[1], _thread(patch)
        spans = image_spans(state.placeholder, text._tokenreduce_chunk)
        video_spans = state.video_spans() if state.video is not None else []
        if before is None:
            mask = state.prompt_mask(embeds)
            lengths = tuple(int(v) for v in mask.sum(1).tolist())
            tile, device = text._tokenreduce_tile, embeds.device
            images = [_whole(n, _grid(state, i, n, tile), device=device) for i, (_, _, n) in enumerate(spans)]
            videos = [_whole(n, lay.grid, lay.frames, device) for (_, _, n), lay in zip(video_spans, state.videos)]
            positions = "reindex" if state.llm_reindex else "keep"
            thread.record = VLMRecord(tuple(images), lengths, lengths, positions, None, videos=tuple(videos))
        else:
            mask = before.mask
        records = [*thread.record.images, *thread.record.videos]
        layouts = [None] * len(spans) + list(state.videos)
        acts = ["image" in inside.modalities] * len(spans) + ["video" in inside.modalities] * len(video_spans)
        entering = []
        for (row, start, _), record, layout, on in zip(spans + video_spans, records, layouts, acts):
            if not on:
                continue
            if before is not None:  # each span's kept tokens sit at the front of where it went
                start = int((before.embed_index[row] == start).nonzero()[0]) if record.kept else 0
            whole = record.kept == record.placeholders
            frames, grid = (1, None) if layout is None else (layout.frames, layout.grid if whole else None)
            entering.append(ImageSpan(row, start, record.kept, frames, grid))
        thread.reduced = None
        run = hf_llm.open_run(inside, text, entering, mask, state.llm_reindex)
        thread.llm = run
        try:
            out = forward()
        finally:
            thread.llm = None
        if out.cache is not None:
            setattr(out.cache, hf_llm.STAGES, hf_llm.Pruned(tuple(run.stages), run.rotary))
        selection = hf_llm.open_selection(run, text, out.cache)
        pruned = iter(zip(run.origin, run.owner))
        for i, on in enumerate(acts):
            if on:
                kept, slot = next(pruned)
                owner = torch.where(records[i].owner >= 0, slot[records[i].owner.clamp(min=0)], -1)
                records[i] = dataclasses.replace(records[i], kept=kept.shape[0], owner=owner, position=records[i].position[kept])
        thread.record = dataclasses.replace(
            thread.record,
            images=tuple(records[: len(spans)]),
            videos=tuple(records[len(spans) :]),
            layer_lengths=tuple(run.lengths),
            steps=tuple(run.steps),
            decode_steps=[] if selection is None else selection.steps,
        )
        return out

    def record(self, patch: Patch) -> VLMRecord | None:
        return _thread(patch).record


def _layout_key(layout: AnyResLayout) -> tuple:
    return (layout.crops, tuple(layout.part.tolist()), tuple(layout.row.tolist()), tuple(layout.col.tolist()))


def _per_span_attention(cls: Tensor, layouts: list[AnyResLayout]) -> list[Tensor]:
    """Per image, ``[L]``: each token's own crop's (or base image's) class-token attention at its
    patch (0 on newline tokens), from ``cls [crops of all images, 1 + side*side]`` in image order."""
    out, offset = [], 0
    for layout in layouts:
        crops = cls[offset : offset + layout.tower_images, 1:]
        offset += crops.shape[0]
        side = layout.side
        line = layout.part < 0
        patch = (layout.row % side * side + layout.col % side).to(cls.device)
        take = crops[layout.part.clamp(min=0).to(cls.device), patch]
        out.append(take.masked_fill(line.to(cls.device), 0.0))
    return out


def _crop_coordinates(crops: int, side: int, cols: int) -> Tensor:
    """``[crops, side*side, 2]`` float64 (row, column) of every patch: in its own grid for the base
    image (crop 0), in the grid of all AnyRes crops (``cols`` crops wide) for the others."""
    t = torch.arange(side * side)
    c = torch.arange(crops)[:, None]
    tile = (c - 1).clamp(min=0)
    r = torch.where(c > 0, tile // cols * side, 0) + t // side
    q = torch.where(c > 0, tile % cols * side, 0) + t % side
    return torch.stack([r, q], dim=-1).double()


def _packing_order(rank: Tensor, position: Tensor, side: int, rows: int, cols: int) -> Tensor:
    """The order of an image's kept tokens (``rank``/``position`` ``[crops, k]``) in its packed span,
    as flat indices into ``[crops * k]``: base image first as it is, then the crops' tokens in place by
    their row-major place in the grid of all crops, then class tokens, then summaries, crop by crop."""
    c, k = rank.shape
    tile = (torch.arange(c)[:, None] - 1).clamp(min=0)
    width = cols * side
    place = (tile // cols * side + position // side) * width + tile % cols * side + position % side
    sequence = torch.arange(c * k).view(c, k)
    span = rows * side * width + c * k  # above every place and sequence number
    key = torch.where(rank.cpu() == IN_PLACE, place, rank.cpu() * span + sequence)
    key[0] = sequence[0] - span  # the base image first
    return key.flatten().argsort(stable=True)


def _packed_owner(where: Tensor, crop_owner: Tensor, slot: Tensor, side: int, cols: int) -> Tensor:
    """``[P]``: the kept token (index in the packed order ``slot [crops, k]``) covering each packed
    placeholder, from the packing trace ``where [P, 2]`` and each crop's owners ``[crops, N]``."""
    length, n = where.shape[0], side * side
    t = torch.arange(length)
    r, q = where[:, 0].round().long().clamp(min=0), where[:, 1].round().long().clamp(min=0)
    base = t < n
    crop = torch.where(base, 0, 1 + r // side * cols + q // side).clamp(max=crop_owner.shape[0] - 1)
    patch = torch.where(base, t.clamp(max=n - 1), r % side * side + q % side)
    out = crop_owner[crop, patch]
    owner = slot[crop, out.clamp(min=0)]
    return torch.where((where[:, 0] < 0) | (out < 0), -1, owner)


def _has(module: nn.Module, path: str) -> bool:
    try:
        _config_path(module, path)
    except AttributeError:
        return False
    return True


def _config_path(config, path: str):
    for part in path.split("."):
        config = getattr(config, part)
    return config


def _square(tokens: int) -> tuple[int, int] | None:
    side = int(round(tokens**0.5))
    return (side, side) if side * side == tokens else None


def _grid(state: VisualState, image: int, tokens: int, tile: int | None) -> tuple[int, int] | None:
    """The grid of an image's visual tokens: from the inputs (Qwen), else a square tile."""
    if image < len(state.grids) and state.grids[image] is not None:
        rows, cols = state.grids[image]
        return (rows, cols) if rows * cols == tokens else None
    return _square(tokens) if tile == tokens else None


def _deepstack(kwargs: dict, embeds: Tensor) -> list[Tensor]:
    """Qwen3-VL's deepstack features laid out like the prompt (one full-length tensor per level), so
    that they follow the same selection and compaction as the embeddings."""
    levels = kwargs.get("deepstack_visual_embeds")
    if not levels:
        return []
    out = []
    for level in levels:
        full = embeds.new_zeros(*embeds.shape[:2], level.shape[-1])
        full[kwargs["visual_pos_masks"]] = level.to(full.dtype)
        out.append(full)
    return out


def _shorten(compaction: Compaction, kwargs: dict, embeds: Tensor, deepstack: list[Tensor]) -> None:
    """The LLM's arguments for the compacted prompt."""
    positions = kwargs.get("position_ids")
    if positions is None:  # what the LLM itself would count for the full prompt
        b, length = embeds.shape[:2]
        positions = torch.arange(length, device=embeds.device).expand(b, -1)
    kwargs["inputs_embeds"] = compaction.embeds(embeds)
    kwargs["position_ids"] = compaction.positions(positions)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, dict):
        kwargs["attention_mask"] = {k: None if v is None else compaction.square_mask(v) for k, v in mask.items()}
    elif mask is not None and mask.dim() == 4:
        kwargs["attention_mask"] = compaction.square_mask(mask)
    else:  # always a 2-D mask: without one, position ids with gaps read as packed sequences
        kwargs["attention_mask"] = compaction.mask if mask is None else compaction.mask.to(mask.dtype)
    if "visual_pos_masks" in kwargs and kwargs["visual_pos_masks"] is not None:
        visual = kwargs["visual_pos_masks"].gather(1, compaction.embed_index) & compaction.mask.bool()
        kwargs["visual_pos_masks"] = visual
        kwargs["deepstack_visual_embeds"] = [compaction.embeds(level)[visual] for level in deepstack]
