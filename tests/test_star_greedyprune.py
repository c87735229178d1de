"""Paper-only in-LLM methods (star, greedyprune): batches equal their rows, keep-all identity, generate()
equals the unpatched model with the pruned tokens masked, and the naive oracles' picks."""

from __future__ import annotations

import pytest
import torch
from test_llm_pruning import assert_equals_unpatched_with_pruned_hidden, check_stages, llava_inputs

import tokenreduce
from conftest import (
    IMAGE_TOKEN,
    VLM_FAMILIES,
    pixels,
    reduce_batch_and_singles,
    tiny_llava,
    tiny_vlm,
    vlm_generate,
    vlm_inputs,
    vlm_logits,
)
from naive_star_greedyprune import greedy_prune, is_top, star_scores

pytest.importorskip("transformers")

METHODS = {
    "star": dict(layers=(1, 3), ratios=(0.5, 0.25)),
    "greedyprune": dict(layer=2, keep_ratio=0.25),
}
KEEP_ALL = {"star": dict(layers=(1, 2), ratios=(1.0, 1.0)), "greedyprune": dict(layer=1, keep_ratio=1.0)}


@pytest.mark.parametrize("family", VLM_FAMILIES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_batch_equals_singles_and_remove_restores(family, method):
    rec = reduce_batch_and_singles(family, method, **METHODS[method])
    n = rec.images[0].placeholders
    assert all(im.kept == max(1, round(n * 0.25)) for im in rec.images)
    assert [s.layer for s in rec.steps] == ([1, 3] if method == "star" else [2])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_keeping_everything_equals_the_unpatched_model(family, method):
    model = tiny_vlm(family)
    kw = vlm_inputs(model, family, [[1, 5], [1, 5, 6, 9, 4]])
    want, want_gen = vlm_logits(model, kw), vlm_generate(model, kw, 4)
    tokenreduce.apply(model, method, **KEEP_ALL[method])
    assert torch.equal(vlm_logits(model, kw), want)
    assert torch.equal(vlm_generate(model, kw, 4), want_gen)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_pruned_generate_equals_the_unpatched_model_with_the_pruned_tokens_masked(method, attention):
    kw = llava_inputs()
    model, base = tiny_llava(), tiny_llava()
    model.set_attn_implementation(attention)
    base.set_attn_implementation(attention)
    tokenreduce.apply(model, method, **METHODS[method])
    assert_equals_unpatched_with_pruned_hidden(model, base, kw, attention == "eager")


def _image(kw: dict, row: int) -> tuple[int, list[int]]:
    """The image's first position in ``row`` and the real text positions after it."""
    start = int((kw["input_ids"][row] == IMAGE_TOKEN).nonzero()[0])
    after = [i for i in range(start + 16, kw["input_ids"].shape[1]) if kw["attention_mask"][row, i]]
    return start, after


def test_star_picks_what_the_naive_reference_picks_at_both_stages():
    kw = llava_inputs()
    model = tokenreduce.apply(tiny_llava(), "star", **METHODS["star"])

    def check(j, step, out, row, candidates):  # the pruning layer's input
        start, after = _image(kw, row)
        queries = [start + c for c in candidates] if j == 0 else after
        scores = star_scores(out.hidden_states[step.layer][row].tolist(), queries, start, candidates)
        assert is_top(scores, step.kept[row].tolist(), (8, 4)[j]), (j, row)

    check_stages(model, kw, check, eager=False, output_hidden_states=True)


def test_star_scores_equal_the_naive_ones_off_saturation():
    """The tiny model's hidden states are large enough to saturate STAR's softmax (many equal scores);
    small random features check the formula itself, queries apart from and among the image tokens."""
    from tokenreduce.methods.star import STAR

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(12, 8, generator=g)
    for queries in (list(range(4, 12)), [0, 1, 2]):
        want = star_scores(hidden.tolist(), queries, 4, list(range(8)))
        got = STAR.score(hidden[queries], hidden[4:12])
        torch.testing.assert_close(got, torch.tensor([want[c] for c in range(8)]), rtol=1e-5, atol=1e-7)
        assert len(set(want.values())) == 8  # no ties: the check can tell tokens apart


@pytest.mark.parametrize("tau", [-1.0, 0.5, 0.7, 1.0])
def test_greedyprune_picks_what_the_naive_reference_picks(tau):
    kw = llava_inputs()
    model = tiny_llava()
    model.set_attn_implementation("eager")
    tokenreduce.apply(model, "greedyprune", layer=2, keep_ratio=0.375, tau=tau)
    vlm_logits(model, kw)
    kept = tokenreduce.record(model).steps[0].kept
    base = tiny_llava()
    base.set_attn_implementation("eager")
    with torch.no_grad():
        out = base(**kw, output_attentions=True, output_hidden_states=True)
    probs, states = out.attentions[1].mean(1), out.hidden_states[2]  # layer K-1's attention, layer K's input
    fastv = tokenreduce.apply(tiny_llava(), "fastv", layer=2, keep_ratio=0.375)
    vlm_logits(fastv, kw)
    by_saliency = [k.tolist() for k in tokenreduce.record(fastv).steps[0].kept]
    for row in range(2):
        start, _ = _image(kw, row)
        last = int(kw["attention_mask"][row].nonzero()[-1])
        saliency = probs[row, last, start : start + 16].tolist()
        want = greedy_prune(saliency, states[row, start : start + 16].tolist(), 6, tau)
        assert kept[row].tolist() == want
    # tau 1 constrains nothing and tau -1 lets one token in, then fills by saliency: FastV's picks
    same = [k.tolist() == want for k, want in zip(kept, by_saliency)]
    assert all(same) if tau in (-1.0, 1.0) else not all(same)


def test_star_scales_its_default_layers_to_the_depth():
    text = tokenreduce.describe(tokenreduce.apply(tiny_llava(), "star"))  # (2, 16) of 32 layers
    assert "pruned before LLM layers 1, 2 of 4: 16 -> 8 -> 4" in text


def test_star_needs_text_after_the_image():
    model = tokenreduce.apply(tiny_llava(), "star", **METHODS["star"])
    ids = torch.tensor([[1, 5, *[IMAGE_TOKEN] * 16]])
    with pytest.raises(ValueError, match=r"star scores each image's late stage by the text after it; image 0 \(row 0\)"):
        vlm_logits(model, dict(input_ids=ids, pixel_values=pixels(1)))


@pytest.mark.parametrize(
    "method, config, match",
    [
        ("star", dict(ratios=(0.25, 0.5)), "ratios must be two non-increasing fractions"),
        ("star", dict(ratios=(0.5,)), "ratios must be two non-increasing fractions"),
        ("star", dict(ratios=(0.5, 0.0)), r"ratios\[1\] must be a number in \(0, 1\]"),
        ("star", dict(layers=(2, 2)), "layers must be two increasing layer indices"),
        ("star", dict(layers=(1, 4)), r"layers must be in \[1, 3\] for an LLM of 4 layers, got 4"),
        ("greedyprune", dict(layer=4), r"layer must be in \[1, 3\] for an LLM of 4 layers, got 4"),
        ("greedyprune", dict(keep_ratio=0.0), r"keep_ratio must be a number in \(0, 1\]"),
        ("greedyprune", dict(tau=1.5), r"tau must be a number in \[-1, 1\]"),
    ],
)
def test_bad_config_raises_with_range(method, config, match):
    model = tiny_llava()
    with pytest.raises(ValueError, match=match):
        tokenreduce.apply(model, method, **config)
    assert not tokenreduce.is_patched(model)
