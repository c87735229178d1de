"""ToDRE (one name at two places): the diverse subset before the LLM against naive loops, every visual
token dropped at the migration layer (generate against the unpatched model with them masked), batches,
keep-all identity of the pre-LLM part, remove(), config errors."""

from __future__ import annotations

import pytest
import torch
from test_llm_pruning import assert_equals_unpatched_with_pruned_hidden, llava_inputs

import naive_todre
import tokenreduce
from conftest import reduce_batch_and_singles, tiny_llava, tiny_vlm, vlm_generate, vlm_inputs, vlm_logits
from tokenreduce.methods.todre import ToDREDiversity

pytest.importorskip("transformers")


@pytest.mark.parametrize("algorithm", ["k_center", "max_sum"])
def test_the_llm_reads_the_naive_loops_diverse_tokens(algorithm):
    model, kw = tiny_llava(), llava_inputs()
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=kw["pixel_values"]).pooler_output
    tokenreduce.apply(model, ToDREDiversity(keep_tokens=6, algorithm=algorithm))
    vlm_logits(model, kw)
    naive = getattr(naive_todre, algorithm)
    picks = [image.position.tolist() for image in tokenreduce.record(model).images]
    assert picks == [naive(f, 6) for f in feats]
    assert naive_todre.k_center(feats[0], 6) != naive_todre.max_sum(feats[0], 6)  # the two rules tell apart here


def test_one_name_stacks_the_diverse_subset_and_the_migration_layer():
    model, kw = tiny_llava(), llava_inputs()
    tokenreduce.apply(model, "todre")  # defaults: 10% kept (2 of 16), all dropped at the middle layer (2 of 4)
    described = tokenreduce.describe(model)
    assert "into the LLM: 16 -> 2" in described and "pruned before LLM layers 2 of 4: 2 -> 0" in described
    vlm_generate(model, kw)
    rec = tokenreduce.record(model)
    text = [int(m.sum()) - 16 for m in kw["attention_mask"]]
    assert rec.layer_lengths[0] == tuple(t + 2 for t in text) and rec.layer_lengths[-1] == tuple(text)
    assert [s.layer for s in rec.steps] == [2] and all(k.numel() == 0 for k in rec.steps[0].kept)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_batch_equals_singles_and_remove_restores(family):
    rec = reduce_batch_and_singles(family, "todre", keep_ratio=0.25, layer=3, algorithm="max_sum")
    n = rec.images[0].placeholders
    assert all(im.kept == 0 for im in rec.images)
    assert [lengths[-1] for lengths in rec.layer_lengths] == [rec.llm_lengths[-1]] * 3 + [rec.input_lengths[-1] - n]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_generate_equals_the_unpatched_model_with_every_image_token_masked_from_the_layer(attention):
    kw = llava_inputs()
    model, base = tiny_llava(), tiny_llava()
    model.set_attn_implementation(attention)
    base.set_attn_implementation(attention)
    tokenreduce.apply(model, "todre", keep_ratio=1.0, layer=2)  # everything reaches the LLM, then nothing from layer 2 on
    _, got_logits = assert_equals_unpatched_with_pruned_hidden(model, base, kw, attention == "eager")
    assert not torch.equal(got_logits, vlm_logits(base, kw)[:, -1])  # dropping the image changed the output


@pytest.mark.parametrize("algorithm", ["k_center", "max_sum"])
def test_the_pre_llm_part_keeping_everything_equals_the_unpatched_model(algorithm):
    model = tiny_vlm("llava")
    kw = vlm_inputs(model, "llava", [[1, 5], [1, 5, 6, 9, 4]])
    want, want_gen = vlm_logits(model, kw), vlm_generate(model, kw)
    tokenreduce.apply(model, ToDREDiversity(keep_ratio=1.0, algorithm=algorithm))
    assert torch.equal(vlm_logits(model, kw), want) and torch.equal(vlm_generate(model, kw), want_gen)


@pytest.mark.parametrize(
    "config, error, match",
    [
        (dict(algorithm="dpp"), ValueError, r"algorithm must be one of \('k_center', 'max_sum'\), got 'dpp'"),
        (dict(layer=0), ValueError, r"layer must be an integer >= 1, got 0"),
        (dict(layer=4), ValueError, r"layer must be in \[1, 3\] for an LLM of 4 layers, got 4"),
        (dict(keep_ratio=0.0), ValueError, r"keep_ratio must be a number in \(0, 1\], got 0.0"),
        (dict(keep_ratio=0.5, keep_tokens=3), ValueError, "pass keep_ratio or keep_tokens, not both"),
        (dict(positions="original"), ValueError, r"positions must be one of"),
    ],
)
def test_bad_config_raises_with_range(config, error, match):
    with pytest.raises(error, match=match):
        tokenreduce.apply(tiny_llava(), "todre", **config)


def test_the_parts_are_not_config():
    with pytest.raises(TypeError, match=r"method 'todre' at stage llm got unknown config \['inside'\]"):
        tokenreduce.apply(tiny_llava(), "todre", inside="fastv")


def test_the_diverse_subset_stacks_with_another_in_llm_method():
    kw = llava_inputs()
    model = tokenreduce.apply(tiny_llava(), [ToDREDiversity(keep_tokens=8), ("fastv", {"layer": 2, "keep_ratio": 0.5})])
    vlm_generate(model, kw)
    rec = tokenreduce.record(model)
    assert [im.kept for im in rec.images] == [4, 4]
    assert "todre_diversity(keep_ratio=None, keep_tokens=8" in tokenreduce.describe(model)
