"""VisionDrop: VisionZip before the LLM, then visual-only attention ranking and merging inside it."""

from __future__ import annotations

import pytest
import torch

import tokenreduce
from conftest import pixels, prompt, reduce_batch_and_singles, tiny_llava, vlm_generate, vlm_logits
from naive_visiondrop import dominant_then_contextual, visual_scores_and_keys
from tokenreduce.methods.visiondrop import VisionDropLLM

pytest.importorskip("transformers")

SMALL = dict(dominant=10, contextual=2, stages=((6, 2), (4, 1), (2, 1)))  # 16 -> 12 -> 8 -> 5 -> 3


def single(text: list[int], seed: int = 3) -> dict:
    return dict(input_ids=torch.tensor([prompt(text)]), pixel_values=pixels(1, seed))


def inputs_of(model, index: int, kw: dict) -> list[torch.Tensor]:
    """Every input of LLM layer ``index``'s input norm during one forward of ``model``."""
    seen = []
    norm = model.model.language_model.layers[index].input_layernorm
    hook = norm.register_forward_pre_hook(lambda m, a: seen.append(a[0][0]))
    vlm_logits(model, kw)
    hook.remove()
    return seen


def test_the_llm_reads_what_visionzip_gives_it():
    kw = single([1, 5])
    got = inputs_of(tokenreduce.apply(tiny_llava(), "visiondrop", **SMALL), 0, kw)
    want = inputs_of(tokenreduce.apply(tiny_llava(), "visionzip", dominant=10, contextual=2), 0, kw)
    assert torch.equal(got[0], want[0]) and got[0].shape[0] == 2 + 12 + 2


@pytest.mark.parametrize("text", [[1, 5], [1, 5, 6, 9, 4]])
def test_every_stage_picks_and_merges_what_the_naive_reference_does(text):
    kw = single(text)
    model = tokenreduce.apply(tiny_llava(), "visiondrop", **SMALL)
    seen = {layer: inputs_of(model, layer, kw) for layer in (1, 2, 3)}  # [input scored, input kept] per layer
    rec = tokenreduce.record(model)
    text_model = model.model.language_model
    start, origin = len(text), list(range(12))
    for step, (dominant, contextual) in zip(rec.steps, SMALL["stages"]):
        layer = text_model.layers[step.layer]
        hidden = seen[step.layer][0]  # the norm's input is the layer's input
        n = len(origin)
        scores, keys = visual_scores_and_keys(layer, text_model.rotary_emb, hidden, start, n)
        metric = keys.mean(0)[start : start + n]
        picked, states = dominant_then_contextual(scores, metric, hidden[start : start + n], dominant, contextual)
        origin = [origin[i] for i in picked]
        assert step.kept[0].tolist() == origin, step.layer
        torch.testing.assert_close(seen[step.layer][1][start : start + len(picked)], states, rtol=1e-5, atol=1e-5)


QWEN = dict(dominant=3, contextual=1, stages=((2, 1), (2, 0), (1, 0)))  # 4 -> 4 -> 3 -> 2 -> 1


@pytest.mark.parametrize("family, config", [("llava", SMALL), ("qwen2_vl", QWEN)])
def test_batch_equals_singles_and_remove_restores(family, config):
    rec = reduce_batch_and_singles(family, "visiondrop", **config)
    final = sum(config["stages"][-1])
    assert [s.layer for s in rec.steps] == [1, 2, 3] and all(im.kept == final for im in rec.images)


@pytest.mark.parametrize("text", [[1, 5], [2, 3, 4]])
def test_generate_equals_greedy_forwards_of_the_pruned_model(text):
    """Scores come from the image's own (causal) queries, so the tokens after it never change the choice:
    each generated token is the argmax of a full forward over the prompt and the tokens so far."""
    model = tokenreduce.apply(tiny_llava(), "visiondrop", **SMALL)
    kw = single(text)
    got = vlm_generate(model, kw, 4)
    ids = kw["input_ids"]
    for _ in range(4):
        nxt = vlm_logits(model, dict(kw, input_ids=ids))[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    assert torch.equal(got, ids[:, -4:]) and tokenreduce.record(model).layer_lengths[-1][0] == len(text) + 3 + 2 + 3


def test_keeping_every_token_in_the_llm_equals_the_unpatched_model():
    model = tiny_llava()
    kw = dict(single([1, 5, 6]), attention_mask=torch.ones(1, 21, dtype=torch.long))
    want, want_gen = vlm_logits(model, kw), vlm_generate(model, kw, 4)
    tokenreduce.apply(model, VisionDropLLM(stages=((16, 0),) * 3))
    assert torch.equal(vlm_logits(model, kw), want)
    assert torch.equal(vlm_generate(model, kw, 4), want_gen)
    tokenreduce.remove(model)
    assert torch.equal(vlm_logits(model, kw), want)


@pytest.mark.parametrize(
    "config, error, match",
    [
        (dict(dominant=0), ValueError, "dominant must be an integer >= 1, got 0"),
        (dict(contextual=-1), ValueError, "contextual must be an integer >= 0, got -1"),
        (dict(stages=((4, 1), (6, 0))), ValueError, "stages must be a non-empty sequence of pairs whose totals do not increase"),
        (dict(stages=((0, 3),)), ValueError, r"stages\[0\] must be a \(dominant >= 1, contextual >= 0\) pair"),
        (dict(stages=((4, 1, 2),)), ValueError, r"stages\[0\] must be a \(dominant >= 1, contextual >= 0\) pair"),
        (dict(layers=(2, 1, 3)), ValueError, "layers must be 3 increasing layer indices"),
        (dict(layers=(1, 2, 4)), ValueError, r"layers must be in \[1, 3\] for an LLM of 4 layers, got 4"),
        (dict(dominant=14, contextual=4), ValueError, "dominant \\+ contextual must be at most the 16 tokens"),
        (dict(positions="shift"), ValueError, "positions must be one of"),
    ],
)
def test_bad_config_raises_with_range(config, error, match):
    model = tiny_llava()
    with pytest.raises(error, match=match):
        tokenreduce.apply(model, "visiondrop", **{**SMALL, **config})
    assert not tokenreduce.is_patched(model)
