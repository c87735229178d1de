"""Hugging Face vision-language models (transformers 5.x): encoder and pre-LLM stages.

Facts relied on (transformers 5.24 and the spec's hooking notes): ``XForConditionalGeneration.model``
is an ``XModel`` whose ``get_image_features`` runs the vision tower, takes the hidden states of
``vision_feature_layer`` and projects them (``pooler_output``: one tensor per image). Its ``forward``
embeds ``input_ids``, scatters the image features over the image placeholder tokens in row-major
order (checking that the counts match), then calls its ``language_model`` with the keyword arguments
``inputs_embeds``, ``attention_mask``, ``position_ids`` and ``cache``. ``generate`` calls
``get_image_features`` itself before the prefill (``mm_encoder_outputs``), computes position ids
once from the full prompt and adds one per step, and grows the 2-D mask from the prompt's length.

No forward is re-implemented; mixins sit at three places:
- ``XModel.forward`` opens the per-call :class:`VisualState` (where the image tokens of the prompt are);
- the projector, for encoder-stage methods and for methods that select among the vision encoder's
  hidden states (VisionZip): it reduces, then writes each image's kept tokens to the front of a span of
  the original length, so that the model's own placeholder check and scatter run unchanged, and
  leaves what each image kept for the prompt that will read these features (``generate`` computes
  them before the prefill, so this cannot wait for the forward);
- the LLM: at the prompt, a pre-LLM method selects among each image span's embeddings (they are the
  projected features), then every span shrinks to its kept tokens in the embeddings, the 2-D mask and
  the position ids, re-padding rows that lost different amounts; on decode steps the mask ``generate``
  grew is shortened and reindexed positions move back. The compaction travels on the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from tokenreduce.adapters.base import Adapter, BlockCost, class_names
from tokenreduce.adapters.hf_vision import TOWERS, HFVisionTower
from tokenreduce.core import Selection
from tokenreduce.core.sequence import Compaction, SpanKeep, compact
from tokenreduce.methods.base import EncoderMethod, Method
from tokenreduce.methods.visual import VisualContext, VisualMethod
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
    ``grid``: (rows, cols) of the visual tokens when they form one.
    """

    placeholders: int
    kept: int
    owner: Tensor
    position: Tensor
    grid: tuple[int, int] | None


@dataclass(frozen=True)
class VLMRecord:
    """What the calling thread's last prompt (a forward with images, or ``generate``'s prefill) did.

    ``input_lengths`` / ``llm_lengths``: per row, the tokens (padding excluded) the LLM would have read
    and did read. ``positions``: ``"keep"`` or ``"reindex"``. ``encoder``: the vision encoder's record
    when an encoder-stage method ran.
    """

    images: tuple[ImageRecord, ...]
    input_lengths: tuple[int, ...]
    llm_lengths: tuple[int, ...]
    positions: str
    encoder: Record | None


@dataclass
class VisualState:
    """One ``XModel`` forward call: where its prompt's image tokens are."""

    placeholder: Tensor | None  # [B, L] True on image tokens
    reindex: bool  # kept visual tokens get consecutive position ids
    active: bool = True


@dataclass
class ReducedImages:
    """Features the projector reduced (kept tokens at the front of full-length spans), waiting for the
    prompt that reads them."""

    features: Tensor  # [M, N, D]
    images: list[ImageRecord]
    encoder: Record | None


@dataclass
class VLMThread:
    """One thread's VLM state: its running or last forward, its last prompt's record, the vision
    layer's captures, and features reduced but not yet read."""

    state: VisualState | None = None
    record: VLMRecord | None = None
    hidden: Tensor | None = None
    q: Tensor | None = None
    k: Tensor | None = None
    reduced: ReducedImages | None = None


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
    """Where a VLM family keeps its parts (attribute names on ``XModel``) and how its positions work."""

    vision: str = "vision_tower"
    projector: str = "multi_modal_projector"
    text: str = "language_model"
    image_token: str = "image_token_id"  # config attribute
    mrope: bool = False  # multi-row position ids that encode the image grid (Qwen)


FAMILIES = {
    "transformers.models.llava.modeling_llava.LlavaModel": Family(),
}


def _family(model: nn.Module) -> Family | None:
    return next((FAMILIES[n] for n in class_names(model) if n in FAMILIES), None)


def _records(selection: Selection, offset: int, placeholders: int, grid: tuple[int, int] | None) -> list[ImageRecord]:
    """One record per row of a selection over tokens whose first ``offset`` are not visual tokens of
    the LLM (a class token); an output whose representative is such a token takes the first position."""
    owner = selection.slot[:, offset:]
    position = (selection.index - offset).clamp(min=0)
    return [ImageRecord(placeholders, selection.num_out, o, p, grid) for o, p in zip(owner, position)]


def _records_from_owner(owner: Tensor, kept: int, grid: tuple[int, int] | None) -> list[ImageRecord]:
    """Records for an encoder-stage reduction: ``owner [M, N]`` maps each visual token to its output;
    an output takes the position of the first visual token it covers."""
    m, n = owner.shape
    covered = torch.where(owner >= 0, owner, kept)
    first = torch.full((m, kept + 1), n, dtype=torch.long, device=owner.device)
    first = first.scatter_reduce(1, covered, torch.arange(n, device=owner.device).expand(m, -1), reduce="amin")
    return [ImageRecord(n, kept, o, f[:kept], grid) for o, f in zip(owner, first)]


def _front(kept: Tensor, length: int) -> Tensor:
    """``[M, k, D]`` kept tokens at the front of ``length``-token spans (zeros after)."""
    return torch.cat([kept, kept.new_zeros(kept.shape[0], length - kept.shape[1], kept.shape[2])], dim=1)


@loadable
class VLMModel:
    """Mixed in front of ``XModel``: opens the forward's :class:`VisualState`."""

    def forward(self, *args, **kwargs):
        patch: Patch = getattr(self, ATTR)
        adapter: HFVLM = patch.adapter  # type: ignore[assignment]
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        images = kwargs.get("pixel_values", args[1] if len(args) > 1 else None) is not None or bool(
            kwargs.get("mm_encoder_outputs")
        )
        if images and input_ids is None:
            raise ValueError("token reduction in a VLM needs input_ids (to find the image tokens), not only inputs_embeds")
        placeholder = None if input_ids is None else input_ids == getattr(self.config, adapter.spec(self).image_token)
        if images and not placeholder.any():
            raise ValueError("images were given but the prompt (input_ids) has no image tokens")
        state = VisualState(placeholder, adapter.reindex(self, patch.method))
        _thread(patch).state = state
        try:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        finally:
            state.active = False


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
        prompt = state is not None and state.active and state.placeholder is not None and bool(state.placeholder.any())
        if prompt and kwargs["inputs_embeds"].shape[1] == state.placeholder.shape[1]:
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError(
                    "pre-LLM token reduction needs the prompt to start an empty cache; continuing a cache is not supported"
                )
            adapter: HFVLM = patch.adapter  # type: ignore[assignment]
            compaction = adapter.compact_prompt(patch, state, kwargs, self._tokenreduce_geometry)
            out = super().forward(**kwargs)  # type: ignore[misc]
            if out.cache is not None:
                setattr(out.cache, COMPACTION, compaction)
            return out
        compaction: Compaction | None = getattr(cache, COMPACTION, None) if cache is not None else None
        if compaction is not None:
            _decode_step(compaction, cache, kwargs)
        return super().forward(**kwargs)  # type: ignore[misc]


def _decode_step(compaction: Compaction, cache, kwargs: dict) -> None:
    """Carry a decode step after a compacted prompt: the mask ``generate`` grew from the full prompt is
    shortened to the cache's length, and reindexed positions move back by what each row lost."""
    embeds = kwargs["inputs_embeds"]
    q, cached = embeds.shape[1], cache.get_seq_length()
    full_length = compaction.length + cached - compaction.mask.shape[1] + q
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
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


@register_adapter
class HFVLM(Adapter):
    name = "hf-vlm"
    family = "Hugging Face VLMs (LlavaForConditionalGeneration)"
    stages: ClassVar[tuple[Stage, ...]] = (Stage.ENCODER, Stage.PRE_LLM)
    tower = HFVisionTower()

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _family(model) is not None

    # -- parts --------------------------------------------------------------------------------
    def spec(self, model: nn.Module) -> Family:
        family = _family(model)
        assert family is not None
        return family

    def vision(self, model: nn.Module) -> nn.Module:
        vision = getattr(model, self.spec(model).vision)
        if not HFVisionTower.matches(vision):
            raise TypeError(
                f"{type(model).__name__}'s vision tower is a {type(vision).__name__}; supported towers: {sorted(TOWERS)}"
            )
        return vision

    def feature_layer(self, model: nn.Module) -> int:
        """0-based index of the vision layer whose output the VLM reads (``-1``: the embeddings)."""
        layer = model.config.vision_feature_layer
        if not isinstance(layer, int):
            raise TypeError(f"vision_feature_layer={layer!r}: token reduction needs the features of one vision layer")
        depth = len(self.tower.blocks(self.vision(model)))
        return depth + layer if layer < 0 else layer - 1

    def image_geometry(self, model: nn.Module) -> tuple[int, tuple[int, int] | None, int]:
        """``(visual tokens per image in the prompt, their grid or None, class tokens of the encoder)``."""
        vision = self.vision(model)
        n0 = self.tower.default_num_tokens(vision)
        prefix = self.tower.num_prefix_tokens(vision)
        side = int(round((n0 - prefix) ** 0.5))
        if model.config.vision_feature_select_strategy == "default" and prefix:
            return n0 - prefix, (side, side), prefix
        return n0, ((side, side) if not prefix else None), prefix

    # -- the encoder stage delegates to the tower -----------------------------------------------
    def num_prefix_tokens(self, model: nn.Module) -> int:
        return self.tower.num_prefix_tokens(self.vision(model))

    def has_cls_token(self, model: nn.Module) -> bool:
        return self.tower.has_cls_token(self.vision(model))

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return self.tower.blocks(self.vision(model))

    def default_num_tokens(self, model: nn.Module) -> int | None:
        return self.tower.default_num_tokens(self.vision(model))

    def block_costs(self, model: nn.Module) -> list[BlockCost]:
        return self.tower.block_costs(self.vision(model))

    def stem_head_macs(self, model: nn.Module, num_tokens: int) -> int:
        return self.tower.stem_head_macs(self.vision(model), num_tokens)

    def summary(self, model: nn.Module) -> str:
        text = getattr(model, self.spec(model).text)
        return (
            f"{original_class(model).__name__}: vision {self.tower.summary(self.vision(model))}; "
            f"LLM {original_class(text).__name__} ({model.config.get_text_config()._attn_implementation})"
        )

    # -- checks and installation --------------------------------------------------------------
    def validate(self, model: nn.Module, method: Method) -> None:
        if isinstance(method, EncoderMethod):
            self.tower.validate(self.vision(model), method)
            self.feature_layer(model)
            return
        assert isinstance(method, VisualMethod)
        tokens, grid, _ = self.image_geometry(model)
        method.num_kept(tokens, grid)
        if method.positions == "reindex" and self.spec(model).mrope:
            raise ValueError(
                f"positions='reindex' cannot apply to {type(model).__name__}: its position ids encode the image grid"
            )
        if method.space == "vision":
            self.feature_layer(model)

    def plan(self, model: nn.Module, method: Method) -> list[str]:
        if isinstance(method, EncoderMethod):
            return self.tower.plan(self.vision(model), method)
        tokens, grid, _ = self.image_geometry(model)
        return [f"visual tokens per image into the LLM: {tokens} -> {method.num_kept(tokens, grid)}"]

    def install(self, model: nn.Module, patch: Patch) -> None:
        spec = self.spec(model)
        vision = self.vision(model)
        method = patch.method
        projector = getattr(model, spec.projector)
        if isinstance(method, EncoderMethod):
            patch.set_attr(vision, ATTR, patch)
            self.tower.install(vision, patch)
        elif method.space == "vision":
            layer = self.tower.blocks(vision)[self.feature_layer(model)]
            layout = TOWERS[next(n for n in class_names(vision) if n in TOWERS)].layout
            attention = getattr(layer, layout.attention)
            heads = int(getattr(attention, layout.heads))
            patch.capture(layer, "hidden", mixin=CaptureVision)
            patch.capture(layer.get_submodule(layout.query), "q", heads, mixin=CaptureVision)
            patch.capture(layer.get_submodule(layout.key), "k", heads, mixin=CaptureVision)
            patch.set_attr(projector, "_tokenreduce_scale", float(getattr(attention, layout.scale)))
        if isinstance(method, EncoderMethod) or method.space == "vision":
            patch.set_attr(projector, ATTR, patch)
            patch.set_attr(projector, "_tokenreduce_geometry", self.image_geometry(model))
            patch.set_attr(projector, "_tokenreduce_layer", self.feature_layer(model))
            patch.swap_class(projector, ReducingProjector)
        text = getattr(model, spec.text)
        patch.set_attr(text, ATTR, patch)
        patch.set_attr(text, "_tokenreduce_geometry", self.image_geometry(model))
        patch.swap_class(text, CompactingLLM)
        patch.swap_class(model, VLMModel)

    # -- running ------------------------------------------------------------------------------
    def reindex(self, model: nn.Module, method: Method) -> bool:
        """Whether kept visual tokens get consecutive position ids (see :class:`VisualMethod`)."""
        positions = getattr(method, "positions", "auto")
        return positions == "reindex" or (positions == "auto" and not self.spec(model).mrope)

    def project_reduced(self, projector: nn.Module, patch: Patch, x: Tensor, project) -> Tensor:
        """Project ``x`` (the encoder's features as the VLM selected them) reduced per image, with each
        image's kept tokens at the front of a full-length span."""
        tokens, grid, prefix = projector._tokenreduce_geometry
        thread = _thread(patch)
        method = patch.method
        if isinstance(method, EncoderMethod):
            encoder = patch.current()
            layer = projector._tokenreduce_layer
            owner, kept = encoder.owners(after=layer), encoder.tokens_after(layer)
            if x.shape[1] == kept - prefix:  # the VLM dropped the class token, which stays first
                owner = torch.where(owner[:, prefix:] >= prefix, owner[:, prefix:] - prefix, -1)
                kept -= prefix
            images, encoder_record = _records_from_owner(owner, kept, grid), encoder.record()
            out = project(x)
        else:
            hidden, q, k = thread.hidden, thread.q, thread.k
            if hidden is None or q is None or k is None:
                raise RuntimeError("the vision layer the VLM reads did not run before its projector")
            ctx = VisualContext(hidden, method.num_kept(tokens, grid), prefix, grid, q, k, projector._tokenreduce_scale)
            selection = method.select(ctx)
            thread.hidden = thread.q = thread.k = None
            images, encoder_record = _records(selection, prefix, tokens, grid), None
            out = project(selection.apply(hidden))
        padded = _front(out, tokens)
        thread.reduced = ReducedImages(padded, images, encoder_record)
        return padded

    def compact_prompt(self, patch: Patch, state: VisualState, kwargs: dict, geometry: tuple) -> Compaction:
        """Reduce the prompt's images and shorten the prompt in ``kwargs`` (the LLM's arguments) to the
        kept visual tokens; record what was done."""
        embeds = kwargs["inputs_embeds"]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise TypeError(f"pre-LLM token reduction needs a 2-D attention_mask, got {mask.dim()}-D")
        placeholder, method, thread = state.placeholder, patch.method, _thread(patch)
        tokens, grid, _ = geometry
        spans = embeds[placeholder]  # [images * tokens, D] in row-major order, as the model scattered them
        if spans.shape[0] % tokens:
            raise ValueError(f"the prompt has {spans.shape[0]} image tokens, not a multiple of {tokens} per image")
        if isinstance(method, VisualMethod) and method.space == "projected":
            features = spans.view(-1, tokens, spans.shape[-1])
            selection = method.select(VisualContext(features, method.num_kept(tokens, grid), 0, grid))
            images, encoder = _records(selection, 0, tokens, grid), None
            embeds = embeds.masked_scatter(placeholder[..., None], _front(selection.apply(features), tokens))
        else:
            reduced = thread.reduced
            if reduced is None or not torch.equal(spans, reduced.features.reshape(spans.shape).to(spans.dtype)):
                raise RuntimeError(
                    "the image features of this prompt were not reduced by this model in this thread "
                    "(compute them with the patched model, in the thread that runs the prompt)"
                )
            images, encoder = reduced.images, reduced.encoder
        thread.reduced = None
        compaction = compact(placeholder, mask, [SpanKeep(im.placeholders, im.kept, im.position) for im in images], state.reindex)
        positions = kwargs.get("position_ids")
        if positions is None:  # what the LLM itself would count for the full prompt
            b, length = embeds.shape[:2]
            positions = torch.arange(length, device=embeds.device).expand(b, -1)
        kwargs["inputs_embeds"] = compaction.embeds(embeds)
        kwargs["attention_mask"] = compaction.mask if mask is None else compaction.mask.to(mask.dtype)
        kwargs["position_ids"] = compaction.positions(positions)
        full = torch.ones(embeds.shape[:2], device=embeds.device) if mask is None else mask
        thread.record = VLMRecord(
            images=tuple(images),
            input_lengths=tuple(int(v) for v in full.sum(1).tolist()),
            llm_lengths=tuple(int(v) for v in compaction.mask.sum(1).tolist()),
            positions="reindex" if state.reindex else "keep",
            encoder=encoder,
        )
        return compaction

    def record(self, patch: Patch) -> VLMRecord | None:
        return _thread(patch).record
