"""FrameFusion: the frame merge against a naive loop, a whole prefill and greedy decode against an
unpatched eager LLaVA that applies the same merges and prunes by hand, keep-all identity, batches,
remove(). Before video inputs reach in-LLM methods, an image of 4x4 tokens stands for 4 frames of 4
patches (a test-only layout)."""

from __future__ import annotations

import pytest
import torch

import tokenreduce
from conftest import IMAGE_TOKEN, tiny_llava, vlm_generate, vlm_inputs, vlm_logits
from naive_framefusion import llava_prefill_and_decode, merge_groups, prune_count
from tokenreduce.core.frames import merge_into_previous_frames, previous_frame_similarity
from tokenreduce.methods.framefusion import FrameFusion
from tokenreduce.methods.llm import ImageSpan, LLMContext

pytest.importorskip("transformers")

TOKENS = 4  # generated per prompt
THRESHOLD = dict(layer=1, cost=0.3, similarity_lower_bound=0.1)  # about half the tokens merge: under the cap
CAPPED = dict(layer=1, cost=0.3, similarity_lower_bound=-1.0)  # every later-frame token qualifies: the cap binds


class RowsAsFrames(FrameFusion):
    """LLaVA's 4x4 image tokens read as 4 frames (its rows) of 4 patches."""

    def frame_layout(self, span: ImageSpan) -> tuple[int, int]:
        return 4, 4


def selection_groups(sel) -> list[list[int]]:
    slot = sel.slot[0].tolist()
    return [[i for i, s in enumerate(slot) if s == j] for j in range(sel.num_out)]


@pytest.mark.parametrize("threshold, frames, extra", [(0.2, 4, 0), (-1.0, 3, 1), (0.9, 5, 0)])
def test_merge_matches_the_naive_loop(threshold, frames, extra):
    patches = 6
    g = torch.Generator().manual_seed(0)
    base = torch.randn(patches, 8, generator=g)
    x = base.repeat(frames, 1) + 0.8 * torch.randn(frames * patches, 8, generator=g)  # frames alike, not equal
    x = torch.cat([x, torch.randn(extra, 8, generator=g)])  # a trailing newline token never merges
    method = FrameFusion(similarity_lower_bound=threshold, cost=0.3)
    span = ImageSpan(0, 0, x.shape[0], frames=frames, grid=(2, 3))
    sel = method.merge(x, span)
    want = merge_groups(x, frames, patches, threshold, 0.3)
    assert selection_groups(sel) == want
    assert 0 < sum(len(g) - 1 for g in want) < x.shape[0] - patches or threshold == -1.0  # some merge, not all
    assert sel.index[0].tolist() == [g[0] for g in want]
    torch.testing.assert_close(sel.apply(x[None])[0], torch.stack([x[g].mean(0) for g in want]))


def test_capped_merge_takes_the_most_similar():
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(1))
    sim = previous_frame_similarity(x, 3, 4)
    assert torch.isinf(sim[:4]).all() and sim[4:].isfinite().all()
    sel = FrameFusion(similarity_lower_bound=-1.0, cost=0.5).merge(x, ImageSpan(0, 0, 12, frames=3, grid=(2, 2)))
    merged = sorted(set(range(12)) - set(sel.index[0].tolist()))
    assert merged == sorted(sim.topk(6).indices.tolist())  # int(0.5 * 12)


def test_merge_refuses_first_frame_tokens():
    with pytest.raises(ValueError, match="only tokens of frames after the first"):
        merge_into_previous_frames(torch.tensor([True, False, False, False]), 2, 2)


def test_prune_stage_keeps_the_budgeted_most_attended():
    method = FrameFusion(cost=0.3)
    attention = torch.rand(1, 20, generator=torch.Generator().manual_seed(2))
    span = ImageSpan(0, 3, 10)  # 16 tokens entered the LLM, 6 merged
    ctx = LLMContext(2, 1, torch.zeros(1, 20, 4), [span], [0], attention, torch.ones(1, 20), inputs=[16])
    (sel,) = method.select(ctx)
    count = prune_count(16, 6, 0.3, 28)
    assert 0 < count < 10
    scores = attention[0, 3:13].tolist()
    assert sel.index[0].tolist() == sorted(sorted(range(10), key=lambda i: -scores[i])[:count])


@pytest.mark.parametrize("config", [THRESHOLD, CAPPED], ids=["threshold", "capped"])
def test_prefill_and_generate_equal_the_naive_eager_loop(config):
    model, base = tiny_llava(), tiny_llava()
    base.set_attn_implementation("eager")
    kw = vlm_inputs(model, "llava", [[1, 5, 6]])
    tokenreduce.apply(model, RowsAsFrames(**config))
    got, generated = vlm_logits(model, kw)[0, -1], vlm_generate(model, kw, TOKENS)
    rec = tokenreduce.record(model)
    logits, kept, want = llava_prefill_and_decode(base, kw["input_ids"], kw["pixel_values"], IMAGE_TOKEN, 4, 4, config, TOKENS)
    merged = 16 - rec.steps[0].kept[0].shape[0]
    assert merged == (11 if config is CAPPED else 9)  # int(0.7 * 16) when capped
    assert rec.steps[1].kept[0].tolist() == kept
    assert rec.images[0].kept == len(kept) == prune_count(16, merged, 0.3, 28)
    torch.testing.assert_close(got, logits, rtol=1e-4, atol=1e-5)
    assert generated[0].tolist() == want


def test_keep_all_is_identity_and_remove_restores():
    model = tiny_llava()
    kw = vlm_inputs(model, "llava", [[1, 5, 6]])
    before, generated = vlm_logits(model, kw), vlm_generate(model, kw, TOKENS)
    tokenreduce.apply(model, RowsAsFrames(cost=1.0, similarity_lower_bound=1.5))
    assert torch.equal(vlm_logits(model, kw), before)
    assert torch.equal(vlm_generate(model, kw, TOKENS), generated)
    tokenreduce.apply(model, RowsAsFrames(**THRESHOLD))
    assert not torch.allclose(vlm_logits(model, kw)[:, -1], before[:, -1])
    tokenreduce.remove(model)
    assert torch.equal(vlm_logits(model, kw), before)


def test_batch_equals_singles():
    texts = [[1, 5], [1, 5, 6, 9, 4]]
    model = tokenreduce.apply(tiny_llava(), RowsAsFrames(**THRESHOLD))
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
        (dict(positions="nope"), r"positions must be one of"),
    ],
)
def test_config_errors(config, match):
    with pytest.raises(ValueError, match=match):
        tokenreduce.apply(tiny_llava(), "framefusion", **config)
