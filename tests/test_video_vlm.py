"""Video inputs of Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision routed to pre-LLM and in-LLM methods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import tokenreduce
from conftest import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    tiny_llava,
    tiny_vlm,
    vlm_generate,
    vlm_logits,
    vlm_video,
    vlm_video_inputs,
    vlm_video_tokens,
)
from tokenreduce.core import Selection, keep
from tokenreduce.methods.fastv import FastV
from tokenreduce.methods.llm import LLMContext
from tokenreduce.methods.visual import VideoLayout, VisualContext, VisualMethod

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "llava_onevision"]
TEXTS = [[1, 5], [2, 3, 4, 6]]


@dataclass
class EveryOther(VisualMethod):
    """Test-only video method: keeps a video's even tokens (frame-major order), and notes the layouts it saw."""

    name = "every_other"
    paper = "test"
    modalities = frozenset({"video"})
    seen: ClassVar[list[VideoLayout]] = []

    def has_own_budget(self) -> bool:
        return True

    def num_kept_video(self, layout: VideoLayout) -> int:
        return (layout.tokens + 1) // 2

    def select(self, ctx: VisualContext) -> Selection:
        assert ctx.video is not None and ctx.grid == ctx.video.grid
        EveryOther.seen.append(ctx.video)
        m, n = ctx.features.shape[:2]
        return keep(torch.arange(0, n, 2).expand(m, -1), n)


@dataclass
class VideoFastV(FastV):
    """Test-only: FastV on video spans only, noting the spans it was given."""

    modalities = frozenset({"video"})
    spans: ClassVar[list] = []

    def select(self, ctx: LLMContext) -> list[Selection]:
        VideoFastV.spans.append(list(ctx.spans))
        return super().select(ctx)


def llm_input(model, kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeddings, rotary cos)`` that the LLM's first layer reads on a forward of ``kw`` (row 0)."""
    seen = []
    hook = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, a, k: seen.append((a[0] if a else k["hidden_states"], k["position_embeddings"][0])), with_kwargs=True
    )
    vlm_logits(model, kw)
    hook.remove()
    return seen[0][0][0], seen[0][1][0]


def counted(kw: dict, family: str) -> dict:
    """``kw`` with the position ids ``generate`` gives a padded prompt, for a forward (Qwen computes its own)."""
    if family.startswith("qwen"):
        return kw
    return {**kw, "position_ids": (kw["attention_mask"].cumsum(-1) - 1).clamp(min=0)}


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_equals_the_unpatched_model_and_remove_restores_it(family):
    model = tiny_vlm(family)
    kw = vlm_video_inputs(family, TEXTS)
    logits, tokens = vlm_logits(model, kw), vlm_generate(model, kw)
    tokenreduce.apply(model, "random", keep_ratio=1.0)
    assert torch.equal(vlm_logits(model, kw), logits)
    assert torch.equal(vlm_generate(model, kw), tokens)
    rec = tokenreduce.record(model)
    n = vlm_video_tokens(family)
    assert [(v.placeholders, v.kept, v.frames) for v in rec.videos] == [(n, n, 4)] * 2
    tokenreduce.apply(model, "random", keep_ratio=0.5)
    assert not torch.equal(vlm_logits(model, kw), logits)
    tokenreduce.remove(model)
    assert torch.equal(vlm_logits(model, kw), logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_llm_reads_exactly_the_kept_video_tokens_at_their_positions(family):
    model = tiny_vlm(family)
    kw = vlm_video_inputs(family, TEXTS[:1])
    _, base_cos = llm_input(model, kw)
    with torch.no_grad():
        features = model.model.get_video_features(**vlm_video(family, 1)).pooler_output[0]
    frames_tokens = vlm_video_tokens(family) - (0 if family.startswith("qwen") else 1)
    picked = torch.arange(0, frames_tokens, 2)
    if not family.startswith("qwen"):  # OneVision's newline token follows, kept
        picked = torch.cat([picked, torch.tensor([frames_tokens])])
    EveryOther.seen.clear()
    tokenreduce.apply(model, EveryOther())
    embeds, cos = llm_input(model, kw)
    start, length = int((kw["input_ids"][0] == VIDEO_TOKEN).nonzero()[0]), kw["input_ids"].shape[1]
    assert embeds.shape[0] == length - vlm_video_tokens(family) + picked.shape[0]
    assert torch.equal(embeds[start : start + picked.shape[0]], features[picked])
    grid = (4, 4) if family.startswith("qwen") else (2, 2)
    assert EveryOther.seen == [VideoLayout(4, grid)]
    if family.startswith("qwen"):  # M-RoPE: the kept tokens keep their unpruned positions
        kept = torch.cat([torch.arange(start), start + picked, torch.arange(start + vlm_video_tokens(family), length)])
        assert torch.equal(cos, base_cos[kept])
    else:  # 1-D positions, reindexed: the LLM numbers what it gets
        assert torch.equal(cos, base_cos[: embeds.shape[0]])
    rec = tokenreduce.record(model)
    assert torch.equal(rec.videos[0].position, picked)
    assert rec.videos[0].kept == picked.shape[0] and rec.videos[0].grid == grid and rec.videos[0].frames == 4


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_of_two_videos_equals_each_alone(family):
    model = tiny_vlm(family)
    kw = vlm_video_inputs(family, TEXTS)
    tokenreduce.apply(model, "random", keep_ratio=0.5)
    batched, last = vlm_generate(model, kw), vlm_logits(model, counted(kw, family))[:, -1]
    rec = tokenreduce.record(model)
    assert [v.kept for v in rec.videos] == [32 if family.startswith("qwen") else 8 + 1] * 2  # OneVision: + newline
    for row in range(2):
        single = vlm_video_inputs(family, TEXTS[row : row + 1], seed=7 + row)
        assert torch.equal(vlm_generate(model, single), batched[row : row + 1]), f"row {row}"
        want = vlm_logits(model, counted(single, family))[:, -1]
        torch.testing.assert_close(want, last[row : row + 1], rtol=1e-4, atol=1e-4)


def test_an_image_and_a_video_in_one_prompt_are_reduced_each_per_its_modality():
    model = tiny_vlm("qwen2_vl")
    kw = vlm_video_inputs("qwen2_vl", TEXTS[:1], image=True)
    base, base_cos = llm_input(model, kw)
    image = (kw["input_ids"][0] == IMAGE_TOKEN).nonzero().flatten()
    tokenreduce.apply(model, "random", keep_ratio=0.5)  # acts on both
    vlm_generate(model, kw)
    rec = tokenreduce.record(model)
    assert [im.kept for im in rec.images] == [2] and [v.kept for v in rec.videos] == [32]
    tokenreduce.apply(model, EveryOther())  # videos only: the image passes whole
    embeds, cos = llm_input(model, kw)  # the image comes before the video: its places are unchanged
    assert torch.equal(embeds[image], base[image]) and torch.equal(cos[image], base_cos[image])
    rec = tokenreduce.record(model)
    assert [im.kept for im in rec.images] == [4] and [v.kept for v in rec.videos] == [32]
    vlm_generate(model, kw)


def test_a_video_method_passes_images_and_refuses_families_without_videos():
    model = tiny_vlm("qwen2_vl")
    ids = torch.tensor([[1, 5, 996, *[IMAGE_TOKEN] * 4, 997, 7, 8]])
    kw = dict(input_ids=ids, mm_token_type_ids=(ids == IMAGE_TOKEN).long(), pixel_values=torch.randn(16, 3 * 2 * 14 * 14))
    kw["image_grid_thw"] = torch.tensor([[1, 4, 4]])
    want = vlm_logits(model, kw)
    tokenreduce.apply(model, EveryOther())
    assert torch.equal(vlm_logits(model, kw), want)
    with pytest.raises(TypeError, match="LlavaOnevisionForConditionalGeneration"):
        tokenreduce.apply(tiny_llava(), EveryOther())


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_in_llm_methods_that_act_on_videos_get_their_spans(family):
    model = tiny_vlm(family)
    kw = vlm_video_inputs(family, TEXTS)
    n, grid = vlm_video_tokens(family), ((4, 4) if family.startswith("qwen") else (2, 2))
    VideoFastV.spans.clear()
    tokenreduce.apply(model, VideoFastV(layer=2, keep_ratio=0.5))
    batched = vlm_generate(model, kw)
    start = [int((kw["input_ids"][row] == VIDEO_TOKEN).nonzero()[0]) for row in range(2)]
    assert VideoFastV.spans[0] == [VideoFastV.spans[0][0].__class__(row, start[row], n, 4, grid) for row in range(2)]
    rec = tokenreduce.record(model)
    assert [v.kept for v in rec.videos] == [round(n * 0.5)] * 2 and rec.images == ()
    for row in range(2):  # batch == singles
        single = vlm_video_inputs(family, TEXTS[row : row + 1], seed=7 + row)
        assert torch.equal(vlm_generate(model, single), batched[row : row + 1]), f"row {row}"
    VideoFastV.spans.clear()
    tokenreduce.apply(model, [EveryOther(), VideoFastV(layer=2, keep_ratio=0.5)])  # after a pre-LLM cut: no grid
    vlm_generate(model, kw)
    kept = (vlm_video_tokens(family) + 1) // 2 if family.startswith("qwen") else 9
    assert [(sp.length, sp.frames, sp.grid) for sp in VideoFastV.spans[0]] == [(kept, 4, None)] * 2
