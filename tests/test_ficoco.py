"""FiCoCo-V before the LLM: the tokens the LLM reads against naive loops (CLIP and SigLIP towers),
keep-all identity, batches against rows alone and remove() (LLaVA, Qwen2-VL's merged groups), config errors."""

from __future__ import annotations

import pytest
import torch
from test_llm_pruning import llava_inputs

import naive_ficoco
import tokenreduce
from conftest import reduce_batch_and_singles, tiny_llava, tiny_vlm, vlm_generate, vlm_inputs, vlm_logits

pytest.importorskip("transformers")


@pytest.mark.parametrize("tower, quantile", [("clip", 0.998), ("clip", 0.7), ("siglip", 0.998)])
def test_the_llm_reads_the_naive_loops_tokens(tower, quantile):
    base, kw = tiny_llava(tower=tower), llava_inputs()
    keep, prefix = 5, int(tower == "clip")
    layer = base.model.vision_tower.encoder.layers[0]  # the tiny tower's read layer (-2 of 2)
    with torch.no_grad():
        vis = base.model.vision_tower(kw["pixel_values"], output_hidden_states=True)
        normed = layer.layer_norm1(vis.hidden_states[0])
        q, k = (proj(normed).unflatten(-1, (2, -1)).transpose(1, 2) for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj))
        naive = [
            naive_ficoco.ficoco_v(h, qi, ki, layer.self_attn.scale, prefix, keep, (4, 4), quantile=quantile)
            for h, qi, ki in zip(vis.hidden_states[1], q, k)
        ]
        want = [base.model.multi_modal_projector(torch.tensor(tokens)) for _, tokens in naive]
    model = tokenreduce.apply(base, "ficoco", keep_tokens=keep, quantile=quantile)
    seen = []
    hook = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]), with_kwargs=True
    )
    vlm_logits(model, kw)
    hook.remove()
    rec = tokenreduce.record(model)
    assert [im.position.tolist() for im in rec.images] == [kept for kept, _ in naive]
    for row, expected in enumerate(want):  # left padded: [pad, text, image, 7, 8]
        start = seen[0].shape[1] - 2 - keep
        torch.testing.assert_close(seen[0][row, start : start + keep], expected, rtol=1e-4, atol=1e-5)


def test_keeping_every_patch_equals_the_unpatched_model():
    model = tiny_vlm("llava")
    kw = vlm_inputs(model, "llava", [[1, 5], [1, 5, 6, 9, 4]])
    want, want_gen = vlm_logits(model, kw), vlm_generate(model, kw)
    tokenreduce.apply(model, "ficoco", keep_ratio=1.0)
    assert torch.equal(vlm_logits(model, kw), want) and torch.equal(vlm_generate(model, kw), want_gen)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_batch_equals_singles_and_remove_restores(family):
    rec = reduce_batch_and_singles(family, "ficoco", keep_ratio=0.5)
    assert all(im.kept == max(1, round(im.placeholders * 0.5)) for im in rec.images)
    assert all(bool((im.owner >= 0).all()) for im in rec.images)  # every patch lives on in a kept one


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(beta=1.5), r"beta must be a number in \[0, 1\], got 1.5"),
        (dict(window=0), r"window must be an integer >= 1, got 0"),
        (dict(quantile=-0.1), r"quantile must be a number in \[0, 1\], got -0.1"),
        (dict(keep_ratio=0.0), r"keep_ratio must be a number in \(0, 1\], got 0.0"),
    ],
)
def test_bad_config_raises_with_range(config, match):
    with pytest.raises(ValueError, match=match):
        tokenreduce.apply(tiny_llava(), "ficoco", **config)
