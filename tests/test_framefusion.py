"""FrameFusion: the frame merge against a naive loop, a whole prefill and greedy decode against an
unpatched eager LLaVA that applies the same merges and prunes by hand, keep-all identity, batches,
remove(). Before video inputs reach in-LLM methods, an image of 4x4 tokens stands for 4 frames of 4
patches (a test-only layout)."""

from __future__ import annotations

import pytest
import torch

import tokenreduce
from conftest import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    tiny_llava,
    tiny_vlm,
    vlm_generate,
    vlm_inputs,
    vlm_logits,
    vlm_video_inputs,
    vlm_video_tokens,
)
from naive_framefusion import (
    budget,
    frame_labels,
    llava_prefill_and_decode,
    merge_groups,
    naive_received,
    prune_count,
    top_in_order,
)
from tokenreduce.core.frames import merge_into_previous_same_patch, patch_labels, previous_same_patch_similarity
from tokenreduce.methods.framefusion import FrameFusion, VideoState
from tokenreduce.methods.llm import ImageSpan, LLMContext

pytest.importorskip("transformers")

TOKENS = 4  # generated per prompt
# LLaVA's 16 tokens as 4 frames of 4: 9 merge at layer 1, 2 of the 7 left at layer 2 (a share under 0.3:
# merging stops), the prune at layer 3 (counting the model's own 4 layers in the cost: it drops one more), ranked by
# the last 4 prompt tokens (the reference's Qwen2-VL setting)
PROGRESSIVE = dict(layer=1, cost=0.3, similarity_lower_bound=0.1, ratio_lower_bound=0.3, num_layers=4, query_tokens=4)
ONCE = dict(PROGRESSIVE, ratio_lower_bound=0.9)  # one merge layer, then the prune
CAPPED = dict(layer=1, cost=0.3, similarity_lower_bound=-1.0)  # every later-frame token qualifies: the cap binds
VIDEO = dict(layer=1, cost=0.3, similarity_lower_bound=0.6)  # the defaults: rows merge different shares
THRESHOLDS = {"qwen2_vl": 0.6, "qwen2_5_vl": 0.3, "llava_onevision": 0.6}  # tiny random towers differ
TEXTS = [[1, 5], [2, 3, 4, 6]]


def counted(kw: dict, family: str) -> dict:
    """``kw`` with the position ids ``generate`` gives a padded prompt, for a forward (Qwen computes its own)."""
    if family.startswith("qwen"):
        return kw
    return {**kw, "position_ids": (kw["attention_mask"].cumsum(-1) - 1).clamp(min=0)}


class RowsAsFrames(FrameFusion):
    """Test-only: LLaVA's 4x4 image tokens read as 4 frames (its rows) of 4 patches."""

    modalities = frozenset({"image"})

    def frame_layout(self, span: ImageSpan) -> tuple[int, int]:
        return 4, 4


def selection_groups(sel) -> list[list[int]]:
    slot = sel.slot[0].tolist()
    return [[i for i, s in enumerate(slot) if s == j] for j in range(sel.num_out)]


def video(frames: int, patches: int, extra: int, seed: int = 0) -> torch.Tensor:
    """Frames alike but not equal, and ``extra`` trailing (newline) tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(patches, 8, generator=g).repeat(frames, 1) + 0.8 * torch.randn(frames * patches, 8, generator=g)
    return torch.cat([x, torch.randn(extra, 8, generator=g)])


@pytest.mark.parametrize("threshold, frames, extra", [(0.6, 4, 0), (0.5, 3, 1), (-1.0, 3, 1), (0.9, 5, 0)])
def test_merge_matches_the_naive_loop_twice(threshold, frames, extra):
    patches = 6
    x = video(frames, patches, extra)
    method = FrameFusion(similarity_lower_bound=threshold, cost=0.3)
    state = VideoState(patch_labels(x.shape[0], frames, patches))
    labels = frame_labels(x.shape[0], frames, patches)
    for _ in range(2):  # the second merge pairs tokens with the nearest earlier frame left at their patch
        cap = budget(state.sparsity, 0.3, 28)
        assert cap == method.pruning_ratio(state.sparsity)
        want, capped, share = merge_groups(x, labels, threshold, cap)
        sel = method.merge(x, state)
        assert selection_groups(sel) == want
        assert (state.pruned, state.sparsity[-1] if not capped else None) == (capped, None if capped else share)
        assert sel.index[0].tolist() == [g[0] for g in want]
        torch.testing.assert_close(sel.apply(x[None])[0], torch.stack([x[g].mean(0) for g in want]))
        if capped:
            break
        x, state.patch, labels = (
            sel.apply(x[None])[0] + 0.3 * x[sel.index[0]],
            state.patch[sel.index[0]],
            [labels[g[0]] for g in want],
        )


def test_capped_merge_takes_the_most_similar():
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(1))
    sim = previous_same_patch_similarity(x, patch_labels(12, 3, 4))
    assert torch.isinf(sim[:4]).all() and sim[4:].isfinite().all()
    state = VideoState(patch_labels(12, 3, 4))
    sel = FrameFusion(similarity_lower_bound=-1.0, cost=0.5).merge(x, state)
    merged = sorted(set(range(12)) - set(sel.index[0].tolist()))
    assert merged == sorted(sim.topk(6).indices.tolist())  # int(0.5 * 12)
    assert state.pruned and not state.merging and state.sparsity == []


def test_merge_refuses_a_token_without_an_earlier_one_of_its_patch():
    with pytest.raises(ValueError, match="only a token with an earlier token of its patch can merge"):
        merge_into_previous_same_patch(torch.tensor([True, False, False, False]), patch_labels(4, 2, 2))


def test_prune_stage_keeps_the_budgeted_most_attended():
    method = FrameFusion(cost=0.3, query_tokens=2)
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 4, 20, 8, generator=g), torch.randn(1, 2, 20, 8, generator=g)
    mask = torch.ones(1, 20)
    mask[0, -3:] = 0  # right padding: the last real tokens are 15 and 16
    span = ImageSpan(0, 3, 10)
    state = VideoState(torch.arange(10), [0.375], merging=False)  # 16 tokens, 6 merged at one layer
    ctx = LLMContext(2, 1, torch.zeros(1, 20, 4), [span], [0], None, mask, keys=k, queries=q, scale=0.3, memory=[state])
    (sel,) = method.select(ctx)
    count = prune_count(10, [0.375], 0.3, 28)
    assert 0 < count < 10 and state.pruned
    scores = [naive_received(q[0], k[0], [15, 16], 0.3, 3 + j) for j in range(10)]
    assert sel.index[0].tolist() == top_in_order(scores, count)
    ctx = LLMContext(3, 2, torch.zeros(1, 20, 4), [ImageSpan(0, 3, count)], [0], None, mask, memory=[state])
    (again,) = method.select(ctx)  # pruned once: later layers keep everything
    assert again.gather_only and again.index[0].tolist() == list(range(count))


@pytest.mark.parametrize(
    "config, merges, pruned",
    [(PROGRESSIVE, 2, True), (ONCE, 1, True), (CAPPED, 1, False)],
    ids=["progressive", "once", "capped"],
)
def test_prefill_and_generate_equal_the_naive_eager_loop(config, merges, pruned):
    model, base = tiny_llava(), tiny_llava()
    base.set_attn_implementation("eager")
    kw = vlm_inputs(model, "llava", [[1, 5, 6]])
    tokenreduce.apply(model, RowsAsFrames(**config))
    got, generated = vlm_logits(model, kw)[0, -1], vlm_generate(model, kw, TOKENS)
    rec = tokenreduce.record(model)
    logits, kept, want = llava_prefill_and_decode(base, kw["input_ids"], kw["pixel_values"], IMAGE_TOKEN, 4, 4, config, TOKENS)
    counts = [16] + [step.kept[0].shape[0] for step in rec.steps]
    assert rec.steps[-1].kept[0].tolist() == kept
    # the scenario each config is for: merge layers (counts fall), then a prune, then nothing
    changes = [i for i in range(1, len(counts)) if counts[i] < counts[i - 1]]
    assert len(changes) == merges + pruned, counts
    if config is CAPPED:
        assert counts[1] == 16 - int(0.7 * 16)
    torch.testing.assert_close(got, logits, rtol=1e-4, atol=1e-5)
    assert generated[0].tolist() == want


def test_keep_all_is_identity_and_remove_restores():
    model = tiny_llava()
    kw = vlm_inputs(model, "llava", [[1, 5, 6]])
    before, generated = vlm_logits(model, kw), vlm_generate(model, kw, TOKENS)
    tokenreduce.apply(model, RowsAsFrames(cost=1.0, similarity_lower_bound=1.5))
    assert torch.equal(vlm_logits(model, kw), before)
    assert torch.equal(vlm_generate(model, kw, TOKENS), generated)
    tokenreduce.apply(model, RowsAsFrames(**PROGRESSIVE))
    assert not torch.allclose(vlm_logits(model, kw)[:, -1], before[:, -1])
    tokenreduce.remove(model)
    assert torch.equal(vlm_logits(model, kw), before)


def test_batch_equals_singles():
    texts = [[1, 5], [1, 5, 6, 9, 4]]
    model = tokenreduce.apply(tiny_llava(), RowsAsFrames(**PROGRESSIVE))
    kw = vlm_inputs(model, "llava", texts)
    positions = (kw["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # as generate counts a left-padded row
    batched, last = vlm_generate(model, kw, TOKENS), vlm_logits(model, {**kw, "position_ids": positions})[:, -1]
    counts = [im.kept for im in tokenreduce.record(model).images]
    for row, text in enumerate(texts):
        single = vlm_inputs(model, "llava", [text], seed=3 + row)
        assert torch.equal(vlm_generate(model, single, TOKENS), batched[row : row + 1])
        torch.testing.assert_close(vlm_logits(model, single)[0, -1], last[row], rtol=1e-4, atol=1e-4)
        assert tokenreduce.record(model).images[0].kept == counts[row]


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(cost=0.0), r"cost must be a number in \(0.0357.*, 1\], got 0.0"),
        (dict(cost=1.5), r"cost must be a number in \(0.0357.*, 1\]"),
        (dict(num_layers=1), r"num_layers must be an integer >= 2"),
        (dict(similarity_lower_bound=-2), r"similarity_lower_bound must be a number >= -1"),
        (dict(layer=3), r"layer must be in \[1, 2\] for an LLM of 4 layers"),
        (dict(ratio_lower_bound=1.5), r"ratio_lower_bound must be a number in \[0, 1\]"),
        (dict(positions="nope"), r"positions must be one of"),
        (dict(query_tokens=0), r"query_tokens must be an integer >= 1"),
    ],
)
def test_config_errors(config, match):
    with pytest.raises(ValueError, match=match):
        tokenreduce.apply(tiny_vlm("qwen2_vl"), "framefusion", **config)


def test_refuses_a_family_without_videos():
    with pytest.raises(TypeError, match="'framefusion' acts on videos.*LlavaOnevisionForConditionalGeneration"):
        tokenreduce.apply(tiny_llava(), "framefusion")


def base_hidden(model, kw: dict, layer: int) -> torch.Tensor:
    """The input of LLM layer ``layer`` of the unpatched ``model`` on ``kw``."""
    with torch.no_grad():
        return model(**kw, output_hidden_states=True).hidden_states[layer]


@pytest.mark.parametrize("family", sorted(THRESHOLDS))
def test_videos_merge_as_the_naive_loop_and_a_batch_equals_each_alone(family):
    model, base = tiny_vlm(family), tiny_vlm(family)
    kw = vlm_video_inputs(family, TEXTS)
    before = vlm_logits(model, kw)
    n, (frames, patches) = vlm_video_tokens(family), ((4, 16) if family.startswith("qwen") else (4, 4))
    config = dict(VIDEO, similarity_lower_bound=THRESHOLDS[family])
    tokenreduce.apply(model, "framefusion", **config)
    batched, last = vlm_generate(model, kw, TOKENS), vlm_logits(model, counted(kw, family))[:, -1]
    rec = tokenreduce.record(model)
    assert rec.steps[0].kept[0].shape != rec.steps[0].kept[1].shape  # rows merge differently: re-padded
    for row in range(2):
        single = vlm_video_inputs(family, TEXTS[row : row + 1], seed=7 + row)
        start = int((single["input_ids"][0] == VIDEO_TOKEN).nonzero()[0])
        x = base_hidden(base, counted(single, family), VIDEO["layer"])[0, start : start + n]
        groups, capped, _ = merge_groups(x, frame_labels(n, frames, patches), config["similarity_lower_bound"], 0.7)
        assert not capped and 1 < len(groups) < n
        assert rec.steps[0].kept[row].tolist() == [g[0] for g in groups]  # the first merge, on the unpatched input
        assert torch.equal(vlm_generate(model, single, TOKENS), batched[row : row + 1]), f"row {row}"
        torch.testing.assert_close(vlm_logits(model, counted(single, family))[:, -1], last[row : row + 1], rtol=1e-4, atol=1e-4)
        assert tokenreduce.record(model).videos[0].kept == rec.videos[row].kept < n
    if not family.startswith("qwen"):  # OneVision's trailing newline token is never merged nor, here, pruned away
        assert all(k[-1] == n - 1 for k in rec.steps[0].kept)
    tokenreduce.remove(model)
    assert torch.equal(vlm_logits(model, kw), before)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_keep_all_on_videos_is_the_unpatched_model(family):
    model = tiny_vlm(family)
    kw = vlm_video_inputs(family, TEXTS)
    logits, tokens = vlm_logits(model, kw), vlm_generate(model, kw, TOKENS)
    tokenreduce.apply(model, "framefusion", cost=1.0, similarity_lower_bound=1.5)
    assert torch.equal(vlm_logits(model, kw), logits)
    assert torch.equal(vlm_generate(model, kw, TOKENS), tokens)
    assert [v.kept for v in tokenreduce.record(model).videos] == [vlm_video_tokens(family)] * 2
