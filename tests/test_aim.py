"""AIM: ToMe merging before the LLM, then PageRank pruning at every layer from a middle one."""

from __future__ import annotations

import pytest
import torch
from test_llm_pruning import assert_equals_unpatched_with_pruned_hidden, llava_inputs

import tokenreduce
from conftest import batch, pixels, prompt, reduce_batch_and_singles, tiny_llava, vlm_generate, vlm_logits
from naive_aim import pagerank_scores, tome_round
from tokenreduce.core import Selection, keep
from tokenreduce.core.sequence import hide_columns_keeping_rows
from tokenreduce.methods.aim import AIMMerge, AIMPrune
from tokenreduce.methods.llm import LLMContext

pytest.importorskip("transformers")

SMALL = dict(layer=0, step=0.25)  # 16 -> 4 merged; pruned before layers 1, 2, 3: 3 -> 2 -> 1


def single(text: list[int]) -> dict:
    return dict(input_ids=torch.tensor([prompt(text)]), pixel_values=pixels(1))


def test_the_llm_reads_the_naive_tome_rounds():
    kw = single([1, 5])
    base = tiny_llava()
    seen = []
    hook = base.model.multi_modal_projector.register_forward_hook(lambda m, a, out: seen.append(out[0]))
    vlm_logits(base, kw)
    hook.remove()
    tokens = list(seen[0].detach())
    tokens = tome_round(tome_round(tokens, 8), 4)
    model = tokenreduce.apply(tiny_llava(), "aim", **SMALL)
    got = []
    hook = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, a, kw_: got.append(kw_["hidden_states"] if not a else a[0]), with_kwargs=True
    )
    vlm_logits(model, kw)
    hook.remove()
    torch.testing.assert_close(got[0][0, 2:6], torch.stack(tokens), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("removal", ["drop", "mask"])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
@pytest.mark.parametrize("text", [[1, 5], [1, 5, 6, 9, 4]])
def test_every_layer_keeps_what_the_naive_pagerank_ranks_highest(text, temperature, removal):
    """The kept tokens are the naive ranking's, up to swaps among scores closer than float32 can tell
    (at temperature 0.1 most PageRank scores of a random tiny model are ~0). Dropped tokens are gone
    from the sequence; masked ones stay in it, hidden from every query."""
    kw = single(text)
    method = AIMPrune(layer=0, step=0.125, temperature=temperature, removal=removal)  # 14, 12, 10 of 16
    model = tokenreduce.apply(tiny_llava(), method)
    layers = model.model.language_model.layers
    seen = {}

    def capture(index):
        def hook(module, args, kwargs):
            seen.setdefault(index, (kwargs["hidden_states"][0], kwargs["position_embeddings"]))

        return hook

    hooks = [layers[i].self_attn.register_forward_pre_hook(capture(i), with_kwargs=True) for i in range(3)]
    vlm_logits(model, kw)
    for hook in hooks:
        hook.remove()
    rec = tokenreduce.record(model)
    start, candidates = len(text), list(range(16))
    for j, (step, count) in enumerate(zip(rec.steps, (14, 12, 10), strict=True)):
        hidden, (cos, sin) = seen[step.layer - 1]  # the scoring layer's input, on the current tokens
        if removal == "drop":
            where, masked = dict(zip(candidates, range(start, start + len(candidates)))), frozenset()
        else:
            where, masked = {c: start + c for c in candidates}, frozenset(start + c for c in range(16) if c not in candidates)
        scores = pagerank_scores(layers[step.layer - 1].self_attn, hidden, cos, sin, temperature, 5, masked)
        image = {c: scores[where[c]] for c in candidates}
        cut = sorted(image.values(), reverse=True)[count - 1]
        kept = step.kept[0].tolist()
        assert len(kept) == count and kept == sorted(kept) and set(kept) <= set(candidates), j
        assert all(image[c] >= cut - 1e-6 for c in kept) and all(image[c] <= cut + 1e-6 for c in candidates if c not in kept), j
        if temperature == 0.5:  # scores well apart: exactly the naive choice
            assert kept == sorted(sorted(candidates, key=lambda c: -image[c])[:count]), j
        candidates = kept


@pytest.mark.parametrize("removal", ["drop", "mask"])
@pytest.mark.parametrize("family, config", [("llava", SMALL), ("qwen2_vl", dict(rounds=(0.25,), layer=1, step=0.5))])
def test_batch_equals_singles_and_remove_restores(family, config, removal):
    rec = reduce_batch_and_singles(family, "aim", removal=removal, **config)
    assert all(im.kept == 1 for im in rec.images)
    lengths = [max(row) for row in rec.layer_lengths]  # masking runs every layer on every token
    assert lengths[0] > lengths[-1] if removal == "drop" else len(set(lengths)) == 1


@pytest.mark.parametrize("removal", ["drop", "mask"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_pruned_generate_equals_the_unpatched_model_with_the_pruned_tokens_masked(attention, removal):
    kw = llava_inputs()
    model, base = tiny_llava(), tiny_llava()
    model.set_attn_implementation(attention)
    base.set_attn_implementation(attention)
    tokenreduce.apply(model, AIMPrune(layer=0, step=0.25, removal=removal))
    rec, _ = assert_equals_unpatched_with_pruned_hidden(model, base, kw, attention == "eager")
    assert [len(k) for k in rec.steps[-1].kept] == [4, 4]
    if removal == "mask":  # every layer's cache holds the whole prompt
        with torch.no_grad():
            out = model(**kw, use_cache=True)
        assert {layer.keys.shape[2] for layer in out.cache.layers} == {kw["input_ids"].shape[1]}


class KeepLast(AIMPrune):
    """Masks each image's first tokens (PageRank keeps the first, the one every query sees)."""

    def select(self, ctx: LLMContext) -> list[Selection]:
        return [keep(torch.arange(span.length - k, span.length)[None], span.length) for span, k in zip(ctx.spans, ctx.keep)]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_masked_token_with_nothing_visible_before_it_keeps_its_own_row(attention):
    """An image at the very start of a prompt: its first token, once masked, would see nothing (an
    empty SDPA row gives NaN, which its values would carry to every row)."""
    ids, mask = batch([prompt([]), prompt([1, 5])])
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(2))
    model, base = tiny_llava(), tiny_llava()
    model.set_attn_implementation(attention)
    base.set_attn_implementation(attention)
    tokenreduce.apply(model, KeepLast(layer=0, step=0.25, removal="mask"))
    rec, logits = assert_equals_unpatched_with_pruned_hidden(model, base, kw, attention == "eager")
    assert rec.steps[-1].kept[0].tolist() == [12, 13, 14, 15] and bool(logits.isfinite().all())


@pytest.mark.parametrize("additive", [False, True])
def test_hiding_columns_leaves_a_row_it_would_empty_as_it_was(additive):
    causal = torch.ones(3, 4, dtype=torch.bool).tril(1)[None, None]  # 3 queries after one cached entry
    hidden = torch.tensor([[True, True, False]])  # of the first 3 columns
    want = torch.tensor([[True, True, False, False], [False, False, True, False], [False, False, True, True]])
    mask = causal if not additive else torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(torch.float32).min)
    got = hide_columns_keeping_rows(mask, hidden)
    assert torch.equal(got if not additive else got == 0, want[None, None])
    assert torch.equal(hide_columns_keeping_rows(mask, torch.zeros(1, 3, dtype=torch.bool)), mask)


class KeepAll(AIMPrune):
    def kept(self, tokens: int, stage: int) -> int:
        return tokens


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_masking_nothing_equals_the_unpatched_model_and_remove_restores_it(attention):
    model = tiny_llava()
    model.set_attn_implementation(attention)
    kw = llava_inputs()
    want, want_gen = vlm_logits(model, kw), vlm_generate(model, kw, 4)
    tokenreduce.apply(model, KeepAll(layer=0, step=0.25, removal="mask"))
    assert torch.equal(vlm_logits(model, kw), want) and torch.equal(vlm_generate(model, kw, 4), want_gen)
    assert len(tokenreduce.record(model).steps) == 3
    assert "pruned before LLM layers 1, 2, 3 of 4: 16 -> 16 -> 16 -> 16; the others are masked" in tokenreduce.describe(model)
    tokenreduce.remove(model)
    assert torch.equal(vlm_logits(model, kw), want) and torch.equal(vlm_generate(model, kw, 4), want_gen)


def test_merging_nothing_equals_the_unpatched_model():
    model = tiny_llava()
    kw = llava_inputs()
    want, want_gen = vlm_logits(model, kw), vlm_generate(model, kw, 4)
    tokenreduce.apply(model, AIMMerge(rounds=(0.0,)))
    assert torch.equal(vlm_logits(model, kw), want) and torch.equal(vlm_generate(model, kw, 4), want_gen)
    tokenreduce.remove(model)
    assert torch.equal(vlm_logits(model, kw), want)


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(rounds=(0.6,)), r"rounds\[0\] must be a number in \[0, 0.5\]"),
        (dict(step=0.0), r"step must be a number in \(0, 1\]"),
        (dict(temperature=0.0), r"temperature must be a number"),
        (dict(iterations=0), "iterations must be an integer >= 1, got 0"),
        (dict(layer=3), r"layer \(\+1: pruning follows the scoring layer\) must be in \[1, 3\] for an LLM of 4 layers, got 4"),
        (dict(positions="shift"), "positions must be one of"),
        (dict(removal="hide"), r"removal must be one of \('drop', 'mask'\), got 'hide'"),
        (dict(removal="mask", positions="reindex"), "removal='mask' leaves every token in its place: positions must be 'keep'"),
    ],
)
def test_bad_config_raises_with_range(config, match):
    model = tiny_llava()
    with pytest.raises(ValueError, match=match):
        tokenreduce.apply(model, "aim", **config)
    assert not tokenreduce.is_patched(model)
