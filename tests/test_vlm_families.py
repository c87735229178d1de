"""Every supported VLM family (tiny offline configs): pre-LLM reduction keeps each family's prompt
consistent (masks, 1-D or M-RoPE positions, Qwen3-VL deepstack inputs, Gemma3's 4-D masks)."""

from __future__ import annotations

import pytest
import torch

import tokenreduce
from conftest import VLM_FAMILIES, tiny_vlm, vlm_inputs

pytest.importorskip("transformers")

GEN = dict(max_new_tokens=3, do_sample=False)
TEXTS = [[1, 5], [1, 5, 6, 9, 4], [2, 3, 4]]


def logits(model, kw):
    with torch.no_grad():
        return model(**kw).logits


def generate(model, kw):
    with torch.no_grad():
        return model.generate(**kw, **GEN)[:, -GEN["max_new_tokens"] :]


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_keep_all_equals_the_unpatched_model(family):
    model = tiny_vlm(family)
    kw = vlm_inputs(model, family, TEXTS[:2])
    want, want_gen = logits(model, kw), generate(model, kw)
    tokenreduce.apply(model, "random", keep_ratio=1.0)
    torch.testing.assert_close(logits(model, kw), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(model, kw), want_gen)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_reduced_batch_equals_singles_and_remove_restores(family):
    model = tiny_vlm(family)
    kw = vlm_inputs(model, family, TEXTS)
    before = logits(model, kw)
    tokenreduce.apply(model, "divprune", keep_ratio=0.5)
    batched, last = generate(model, kw), logits(model, kw)[:, -1]
    rec = tokenreduce.record(model)
    assert all(im.kept == max(1, round(im.placeholders / 2)) for im in rec.images)
    assert all(a - b == im.placeholders - im.kept for a, b, im in zip(rec.input_lengths, rec.llm_lengths, rec.images))
    for row in range(len(TEXTS)):
        single = vlm_inputs(model, family, [TEXTS[row]], seed=3 + row)
        assert torch.equal(generate(model, single), batched[row : row + 1]), f"row {row}"
        torch.testing.assert_close(logits(model, single)[:, -1], last[row : row + 1], rtol=1e-4, atol=1e-4)
    tokenreduce.remove(model)
    assert torch.equal(logits(model, kw), before)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "idefics3", "internvl", "gemma3"])
def test_encoder_side_methods_say_where_they_cannot_run(family):
    model = tiny_vlm(family)
    for method, config in [("tome", dict(r=1)), ("visionzip", dict(keep_tokens=2))]:
        with pytest.raises(TypeError, match=r"cannot run in .*Model: its (vision tower|projector)"):
            tokenreduce.apply(model, method, **config)
    assert not tokenreduce.is_patched(model)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_qwen_keeps_grid_positions_and_refuses_reindexing(family):
    model = tiny_vlm(family)
    with pytest.raises(ValueError, match="positions='reindex' cannot apply to .*: its position ids encode the image grid"):
        tokenreduce.apply(model, "random", positions="reindex")
    tokenreduce.apply(model, "pool", stride=2)  # Qwen's grid comes from image_grid_thw: 2x2 merged tokens
    logits(model, vlm_inputs(model, family, TEXTS[:1]))
    rec = tokenreduce.record(model)
    assert rec.positions == "keep" and rec.images[0].grid == (2, 2) and rec.images[0].kept == 1


def test_deepstack_inputs_follow_the_kept_tokens():
    from tokenreduce.adapters.hf_vlm import _deepstack, _shorten
    from tokenreduce.core.sequence import SpanKeep, compact

    embeds = torch.arange(6.0).view(1, 6, 1).expand(1, 6, 2).clone()
    visual = torch.tensor([[False, False, True, True, True, False]])
    level = torch.tensor([[10.0, 10.0], [11.0, 11.0], [12.0, 12.0]])
    kwargs = dict(inputs_embeds=embeds, visual_pos_masks=visual, deepstack_visual_embeds=[level], position_ids=None)
    deepstack = _deepstack(kwargs, embeds)
    # the image keeps its second token, written to the front of its span (as a selection does)
    embeds[0, 2], deepstack[0][0, 2] = embeds[0, 3], deepstack[0][0, 3]
    compaction = compact(torch.ones(1, 6, dtype=torch.long), [SpanKeep(0, 2, 3, 1, torch.tensor([1]))], reindex=False)
    _shorten(compaction, kwargs, embeds, deepstack)
    assert kwargs["inputs_embeds"][0, :, 0].tolist() == [0.0, 1.0, 3.0, 5.0]
    assert kwargs["visual_pos_masks"].tolist() == [[False, False, True, False]]
    assert kwargs["deepstack_visual_embeds"][0].tolist() == [[11.0, 11.0]]
    assert kwargs["position_ids"].tolist() == [[0, 1, 3, 5]]
