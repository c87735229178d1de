"""VScan: global and local scans with merging in the vision encoder, then pruning at a middle LLM layer."""

from __future__ import annotations

import pytest
import torch

import tokenreduce
from conftest import pixels, prompt, reduce_batch_and_singles, tiny_llava, vlm_generate, vlm_logits
from naive_vscan import scan_and_merge

pytest.importorskip("transformers")

SMALL = dict(tokens=8, llm_tokens=4, window=2)  # 16 -> 8 (2 per 2x2 window + 4 global) -> 4 at layer 2


def llm_input(model, kw: dict) -> torch.Tensor:
    seen = []
    layer = model.model.language_model.layers[0]
    hook = layer.register_forward_pre_hook(lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]), with_kwargs=True)
    vlm_logits(model, kw)
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("shallow", [None, 1])  # the read layer (0) itself, or the tower's other layer
def test_the_llm_reads_the_naive_scans_and_merge(shallow):
    kw = dict(input_ids=torch.tensor([prompt([1, 5])]), pixel_values=pixels(1))
    base = tiny_llava()
    base.set_attn_implementation("eager")
    with torch.no_grad():
        out = base.model.vision_tower(kw["pixel_values"], output_attentions=True, output_hidden_states=True)
    row = [a[0].mean(0)[0, 1:].tolist() for a in out.attentions]  # the class token's row per layer
    states = out.hidden_states[1][0, 1:]  # layer 0's output, the one LLaVA reads (vision_feature_layer -2)
    _, merged = scan_and_merge(row[0 if shallow is None else 1], row[0], states, 4, 2, 8, 0.5)
    with torch.no_grad():
        want = base.model.multi_modal_projector(merged)
    model = tokenreduce.apply(tiny_llava(), "vscan", **SMALL, shallow=shallow)
    got = llm_input(model, kw)[0, 2:10]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family, kept", [("llava", 4), ("llava_next", 20)])  # LLaVA-NeXT: 8 per crop, 5 crops, then half
def test_batch_equals_singles_and_remove_restores(family, kept):
    rec = reduce_batch_and_singles(family, "vscan", **SMALL)
    assert [s.layer for s in rec.steps] == [2] and all(im.kept == kept for im in rec.images)


def test_keeping_every_token_equals_the_unpatched_model():
    model = tiny_llava()
    kw = dict(input_ids=torch.tensor([prompt([1, 5]), prompt([2, 3])]), pixel_values=pixels(2))
    want, want_gen = vlm_logits(model, kw), vlm_generate(model, kw, 4)
    tokenreduce.apply(model, "vscan", tokens=16, llm_tokens=16, window=2)
    assert torch.equal(vlm_logits(model, kw), want) and torch.equal(vlm_generate(model, kw, 4), want_gen)
    tokenreduce.remove(model)
    assert torch.equal(vlm_logits(model, kw), want)


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(tokens=0, llm_tokens=1), "tokens must be an integer >= 1, got 0"),
        (dict(tokens=8, llm_tokens=9), r"llm_tokens must be an integer in \[1, 8\], got 9"),
        (dict(tokens=8, window=5), r"window must fit the patch grid \(\(4, 4\)\)"),
        (dict(tokens=20, window=2), "keep_tokens must be at most the 16 tokens of an image, got 20"),
        (dict(tokens=8, window=2, shallow=2), r"shallow must be in \[0, 1\] for a vision tower of 2 layers, got 2"),
        (dict(tokens=8, window=2, global_share=1.5), r"global_share must be a number in \[0, 1\]"),
    ],
)
def test_bad_config_raises_with_range(config, match):
    model = tiny_llava()
    with pytest.raises(ValueError, match=match):
        tokenreduce.apply(model, "vscan", **{"llm_tokens": 4, **config})
    assert not tokenreduce.is_patched(model)


def test_a_tower_without_a_class_token_is_refused():
    model = tokenreduce.apply(tiny_llava(tower="siglip"), "vscan", **SMALL)
    with pytest.raises(ValueError, match="vscan's scans rank patches by the class token's attention"):
        vlm_logits(model, dict(input_ids=torch.tensor([prompt([1, 5])]), pixel_values=pixels(1)))
