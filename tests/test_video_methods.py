"""FastVID and HoliTom (pre-LLM video methods): on video tokens against their naive-loop oracles, a count
fixed by the layout, keep-all identity, batch rows alone; then on tiny video VLMs."""

from __future__ import annotations

import pytest
import torch
from test_video_vlm import TEXTS, llm_input

import tokenreduce
from conftest import VIDEO_TOKEN, tiny_vlm, vlm_generate, vlm_logits, vlm_video, vlm_video_inputs
from naive_fastvid import fastvid as naive_fastvid
from naive_holitom import holitom as naive_holitom
from naive_holitom import inner_merge
from tokenreduce.core import cut_segments, static_windows
from tokenreduce.methods.holitom import HoliTomInner, HoliTomOuter
from tokenreduce.methods.llm import ImageSpan, LLMContext
from tokenreduce.methods.visual import VideoLayout, VisualContext

LAYOUT = VideoLayout(frames=8, grid=(5, 5))
NAIVE = {"fastvid": naive_fastvid, "holitom": naive_holitom}


def pre_llm(name: str, **config):
    """The pre-LLM method the name stands for: ``holitom``'s first part (the name is the whole stack)."""
    return HoliTomOuter(**config) if name == "holitom" else tokenreduce.make_method(name, **config)


def clip(videos: int = 1, seed: int = 0, dim: int = 16, scenes: tuple[int, ...] = (3, 5)) -> torch.Tensor:
    """``[videos, T * P, dim]`` tokens of videos made of scenes: a scene's frames share a base, some of its
    positions barely change from frame to frame (static) and the others move; a new scene starts afresh."""
    gen = torch.Generator().manual_seed(seed)
    p = LAYOUT.grid[0] * LAYOUT.grid[1]
    out = []
    for _ in range(videos):
        frames = []
        for length in scenes:
            base = torch.randn(p, dim, generator=gen)
            moving = (torch.rand(p, 1, generator=gen) < 0.5).float()
            for _ in range(length):
                frames.append(base + (0.05 + 1.5 * moving) * torch.randn(p, dim, generator=gen))
        out.append(torch.cat(frames))
    return torch.stack(out)


def context(x: torch.Tensor, method) -> VisualContext:
    return VisualContext(features=x, keep=method.num_kept_video(LAYOUT), num_prefix=0, grid=LAYOUT.grid, video=LAYOUT)


CASES = [
    ("fastvid", dict(keep_ratio=0.25, tau=0.5, segments=3)),  # multi-frame segments, anchors every 4th frame
    ("fastvid", dict(keep_ratio=0.5, tau=0.5, segments=2, anchor_stride=2)),  # anchor frames overflow to the others
    ("fastvid", dict(keep_tokens=50, tau=0.95, context=0.6, beta=0.0)),  # uneven frame budgets, single-frame segments
    ("holitom", dict()),  # defaults: static windows, dominant dynamic tokens
    ("holitom", dict(keep_ratio=0.3, contextual=0.5, beta=0.6, neighbours=3)),  # clusters among dynamic tokens
    ("holitom", dict(keep_ratio=0.3, max_window=2, beta=None)),  # plain cluster means
    ("holitom", dict(keep_ratio=0.8)),  # more than merging over time leaves: no window merges
]


@pytest.mark.parametrize("name,config", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_naive_oracle(name, config, seed):
    method = pre_llm(name, **config)
    x = clip(seed=seed)
    selection = method.select(context(x, method))
    index, out = NAIVE[name](x[0], LAYOUT.frames, method.num_kept_video(LAYOUT), **config_of(method))
    assert selection.index[0].tolist() == index
    torch.testing.assert_close(selection.apply(x)[0].double(), out, rtol=1e-4, atol=1e-4)


def config_of(method) -> dict:
    skip = {"keep_ratio", "keep_tokens", "positions"}
    return {k: v for k, v in method.params().items() if k not in skip}


def test_clip_has_what_the_cases_exercise():
    """The oracle cases only test merging if the clip has multi-frame segments and static windows."""
    x = clip()[0].view(LAYOUT.frames, -1, 16)
    glob = torch.nn.functional.normalize(x.mean(dim=1), dim=-1)
    assert max(cut_segments((glob[:-1] * glob[1:]).sum(-1), 2, 0.5)) > 1
    unit = torch.nn.functional.normalize(x, dim=-1)
    windows = static_windows((unit[:-1] * unit[1:]).sum(-1) > 0.8)
    assert windows == [(0, 2), (3, 7)]


@pytest.mark.parametrize("name", ["fastvid", "holitom"])
def test_count_depends_on_the_layout_alone(name):
    method = pre_llm(name, keep_ratio=0.3)
    clips = [clip(seed=0, scenes=(8,)), clip(seed=1, scenes=(1,) * 8), clip(seed=2, scenes=(3, 5))]
    counts = {method.select(context(x, method)).num_out for x in clips}
    assert counts == {method.num_kept_video(LAYOUT)}


def test_fastvid_count_is_the_reference_per_frame_count():
    assert tokenreduce.make_method("fastvid").num_kept_video(VideoLayout(32, (14, 14))) == 32 * 19  # int(196 * 0.1)
    assert HoliTomOuter().num_kept_video(VideoLayout(32, (14, 14))) == round(0.15 * 32 * 196)


@pytest.mark.parametrize("name", ["fastvid", "holitom"])
def test_keep_all_is_identity(name):
    method = pre_llm(name, keep_ratio=1.0)
    x = clip(videos=2)
    selection = method.select(context(x, method))
    assert torch.equal(selection.apply(x), x)


@pytest.mark.parametrize("name,config", [CASES[0], CASES[4]])
def test_batch_equals_rows_alone(name, config):
    method = pre_llm(name, **config)
    x = clip(videos=3, seed=4)
    together = method.select(context(x, method))
    for i in range(3):
        alone = method.select(context(x[i : i + 1], method))
        assert torch.equal(together.index[i], alone.index[0])
        torch.testing.assert_close(together.apply(x)[i], alone.apply(x[i : i + 1])[0])


@pytest.mark.parametrize("name", ["fastvid", "holitom"])
def test_acts_on_videos_only(name):
    method = pre_llm(name)
    assert method.modalities == frozenset({"video"})
    images = VisualContext(features=torch.randn(1, 25, 16), keep=5, num_prefix=0, grid=(5, 5))
    with pytest.raises(ValueError, match="videos"):
        method.select(images)


@pytest.mark.parametrize(
    "name,config,match",
    [
        ("fastvid", dict(segments=0), "segments must be an integer >= 1"),
        ("fastvid", dict(context=1.5), r"context must be a number in \[0, 1\]"),
        ("fastvid", dict(anchor_stride=0), "anchor_stride must be an integer >= 1"),
        ("fastvid", dict(beta=-0.1), r"beta must be a number in \[0, 1\]"),
        ("holitom", dict(tau=2), r"tau must be a number in \[-1, 1\]"),
        ("holitom", dict(max_window=0), "max_window must be an integer >= 1"),
        ("holitom", dict(neighbours=0), "neighbours must be an integer >= 1"),
    ],
)
def test_config_errors_name_the_argument(name, config, match):
    with pytest.raises(ValueError, match=match):
        pre_llm(name, **config)


# End to end on tiny Qwen2-VL (M-RoPE, 4 frames of 4x4 tokens) and LLaVA-OneVision (1-D positions, 4 frames of
# 2x2 tokens, then the video's newline token, always kept).
E2E = [("fastvid", dict(keep_ratio=0.5, context=0.5, segments=2)), ("holitom", dict(keep_ratio=0.5, tau=0.5))]
FAMILIES = ["qwen2_vl", "llava_onevision"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name,config", E2E)
def test_the_llm_reads_the_oracle_tokens(family, name, config):
    model = tiny_vlm(family)
    kw = vlm_video_inputs(family, TEXTS[:1])
    _, base_cos = llm_input(model, kw)
    with torch.no_grad():
        features = model.model.get_video_features(**vlm_video(family, 1)).pooler_output[0]
    qwen = family.startswith("qwen")
    frames_tokens = features.shape[0] - (0 if qwen else 1)
    method = pre_llm(name, **config)
    index, out = NAIVE[name](
        features[:frames_tokens], 4, method.num_kept_video(VideoLayout(4, (4, 4) if qwen else (2, 2))), **config_of(method)
    )
    if not qwen:  # the newline token follows
        index, out = [*index, frames_tokens], torch.cat([out, features[frames_tokens:].double()])
    tokenreduce.apply(model, method)
    embeds, cos = llm_input(model, kw)
    start, length = int((kw["input_ids"][0] == VIDEO_TOKEN).nonzero()[0]), kw["input_ids"].shape[1]
    assert embeds.shape[0] == length - features.shape[0] + len(index)
    torch.testing.assert_close(embeds[start : start + len(index)].double(), out, rtol=1e-4, atol=1e-4)
    if qwen or method.positions == "keep":  # kept tokens keep their unpruned positions
        kept = torch.cat([torch.arange(start), start + torch.tensor(index), torch.arange(start + features.shape[0], length)])
        assert torch.equal(cos, base_cos[kept])
    else:  # OneVision reindexed: the LLM numbers what it gets
        assert torch.equal(cos, base_cos[: embeds.shape[0]])
    assert tokenreduce.record(model).videos[0].position.tolist() == index


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name,config", E2E)
def test_on_a_vlm_keep_all_batch_and_remove(family, name, config):
    model = tiny_vlm(family)
    kw = vlm_video_inputs(family, TEXTS)
    logits, tokens = vlm_logits(model, kw), vlm_generate(model, kw)
    tokenreduce.apply(model, pre_llm(name, **{**config, "keep_ratio": 1.0}))
    assert torch.equal(vlm_logits(model, kw), logits)
    assert torch.equal(vlm_generate(model, kw), tokens)
    tokenreduce.apply(model, pre_llm(name, **config))
    batched = vlm_generate(model, kw)
    layout = VideoLayout(4, (4, 4) if family.startswith("qwen") else (2, 2))
    newline = 0 if family.startswith("qwen") else 1
    kept = pre_llm(name, **config).num_kept_video(layout) + newline
    assert [v.kept for v in tokenreduce.record(model).videos] == [kept] * 2
    for row in range(2):
        single = vlm_video_inputs(family, TEXTS[row : row + 1], seed=7 + row)
        assert torch.equal(vlm_generate(model, single), batched[row : row + 1]), f"row {row}"
    tokenreduce.remove(model)
    assert torch.equal(vlm_logits(model, kw), logits)
    assert torch.equal(vlm_generate(model, kw), tokens)


def test_holitom_inner_merge_matches_naive_oracle():
    method = HoliTomInner(layer=2, merge_ratio=0.6)
    gen = torch.Generator().manual_seed(5)
    hidden, attention = torch.randn(2, 30, 16, generator=gen), torch.rand(2, 30, generator=gen)
    spans = [ImageSpan(0, 3, 20, 4, (2, 2)), ImageSpan(1, 5, 17, 4, (2, 2))]
    keep = [method.kept(sp.length, 0) for sp in spans]
    ctx = LLMContext(2, 0, hidden, spans, keep, attention, torch.ones(2, 30))
    for span, count, selection in zip(spans, keep, method.select(ctx)):
        tokens = hidden[span.row, span.start : span.start + span.length]
        index, out = inner_merge(tokens, attention[span.row, span.start : span.start + span.length], count)
        assert selection.index[0].tolist() == index and len(index) == round(0.4 * span.length)
        torch.testing.assert_close(selection.apply(tokens[None])[0].double(), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_holitom_outer_and_inner_on_a_vlm(family):
    model = tiny_vlm(family)
    kw = vlm_video_inputs(family, TEXTS)
    logits, tokens = vlm_logits(model, kw), vlm_generate(model, kw)
    tokenreduce.apply(model, "holitom", keep_ratio=1.0, layer=2, merge_ratio=0.0)
    assert torch.equal(vlm_logits(model, kw), logits)
    assert torch.equal(vlm_generate(model, kw), tokens)
    tokenreduce.apply(model, "holitom", keep_ratio=0.5, tau=0.5, layer=2)
    batched = vlm_generate(model, kw)
    layout = VideoLayout(4, (4, 4) if family.startswith("qwen") else (2, 2))
    outer = HoliTomOuter(keep_ratio=0.5).num_kept_video(layout) + (0 if family.startswith("qwen") else 1)
    assert [v.kept for v in tokenreduce.record(model).videos] == [round(outer * 0.5)] * 2
    for row in range(2):
        single = vlm_video_inputs(family, TEXTS[row : row + 1], seed=7 + row)
        assert torch.equal(vlm_generate(model, single), batched[row : row + 1]), f"row {row}"
    tokenreduce.remove(model)
    assert torch.equal(vlm_logits(model, kw), logits)


@pytest.mark.parametrize("name,config", E2E)
def test_generates_as_the_unpatched_model_fed_the_reduced_prompt(name, config):
    model = tiny_vlm("llava_onevision")
    kw = vlm_video_inputs("llava_onevision", TEXTS[:1])
    tokenreduce.apply(model, pre_llm(name, **{**config, "positions": "reindex"}))
    embeds, _ = llm_input(model, kw)
    want = vlm_generate(model, kw)
    tokenreduce.remove(model)
    reduced = dict(inputs_embeds=embeds[None], attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long))
    assert torch.equal(vlm_generate(model, reduced), want)
