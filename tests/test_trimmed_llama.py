"""Trimmed Llama on Mllama (Llama 3.2 Vision): the kept features against a naive oracle, keep-all
identity, generate() against the unpatched model reading only the kept features, batch against
single rows, remove(), and the refusals on both sides (other methods on Mllama, trimmed_llama elsewhere)."""

from __future__ import annotations

import pytest
import torch

import tokenreduce
from conftest import mllama_inputs, tiny_llava, tiny_mllama
from naive_trimmed_llama import generate_trimmed, kept_features

pytest.importorskip("transformers")

TOKENS = 4  # generated per prompt
TEXTS = [[1, 5], [1, 5, 6, 9, 4]]
TILES = [2, 1]  # the second image fills one tile of two: its second tile is padding


def run(model, kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt logits, greedy tokens)``; the logits with the position ids ``generate`` gives a padded prompt."""
    positions = (kw["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(**kw, position_ids=positions).logits
        tokens = model.generate(**kw, max_new_tokens=TOKENS, do_sample=False)[:, -TOKENS:]
    return logits, tokens


@pytest.fixture(scope="module")
def model():
    return tiny_mllama()


@pytest.mark.parametrize("keep_ratio", [0.1, 0.25, 0.5])
def test_kept_features_match_the_naive_oracle(model, keep_ratio):
    kw = mllama_inputs(TEXTS, TILES)
    want = kept_features(model, kw, keep_ratio)
    with tokenreduce.applied(model, "trimmed_llama", keep_ratio=keep_ratio):
        with torch.no_grad():
            model(**kw)
        rec = tokenreduce.record(model)
    assert rec.features == 34 and rec.layer == 1
    assert [k.tolist() for k in rec.kept] == want
    k = max(1, round(keep_ratio * 34))
    assert all(k <= len(kept) <= 4 * k for kept in want)
    assert len(want[0]) > k  # heads disagree: the union is larger than one head's top-k
    assert all(i < 17 for i in want[1])  # the padding tile is masked: never among the best


def test_keep_all_is_bit_identical(model):
    kw = mllama_inputs(TEXTS, TILES)
    logits, tokens = run(model, kw)
    with tokenreduce.applied(model, "trimmed_llama", keep_ratio=1.0):
        got_logits, got_tokens = run(model, kw)
        assert [k.tolist() for k in tokenreduce.record(model).kept] == [list(range(34))] * 2
    assert torch.equal(got_logits, logits) and torch.equal(got_tokens, tokens)


@pytest.mark.parametrize("row", [0, 1])
def test_generate_equals_the_model_reading_only_the_kept_features(model, row):
    kw = mllama_inputs([TEXTS[row]], [TILES[row]], seed=3 + row)
    plain_logits, _ = run(model, kw)
    with tokenreduce.applied(model, "trimmed_llama", keep_ratio=0.25):
        logits, tokens = run(model, kw)
        (kept,) = tokenreduce.record(model).kept
        with torch.no_grad():
            out = model.generate(**kw, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    text = model.model.language_model
    for i, layer in enumerate(out.cache.layers):  # the cross-attention layers hold the kept features only
        if i in text.cross_attention_layers:
            assert layer.keys.shape[-2] == kept.shape[0]
    want_logits, want_tokens = generate_trimmed(model, kw, kept.tolist(), TOKENS)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, want_tokens)
    assert (plain_logits - logits).abs().max() > 1e-2  # trimming changed what the model read


def test_batch_equals_rows_alone_and_remove_restores(model):
    kw = mllama_inputs(TEXTS, TILES)
    before = model(**kw).logits.detach()
    tokenreduce.apply(model, "trimmed_llama", keep_ratio=0.25)
    try:
        logits, tokens = run(model, kw)
        kept = tokenreduce.record(model).kept
        assert len({k.shape[0] for k in kept}) == 2  # rows of different counts: the shorter one padded
        for row in range(len(TEXTS)):
            single = mllama_inputs([TEXTS[row]], [TILES[row]], seed=3 + row)
            one_logits, one_tokens = run(model, single)
            assert torch.equal(tokenreduce.record(model).kept[0], kept[row]), f"row {row}"
            assert torch.equal(one_tokens, tokens[row : row + 1]), f"row {row}"
            torch.testing.assert_close(one_logits[0, -1], logits[row, -1], rtol=1e-5, atol=1e-5)
    finally:
        tokenreduce.remove(model)
    assert torch.equal(model(**kw).logits, before)
    assert not any(name.startswith("_tokenreduce") for m in model.modules() for name in vars(m))


@pytest.mark.parametrize(
    "method,config,match",
    [
        (
            "fastv",
            {},
            r"method 'fastv' reduces visual tokens in the LLM's sequence; MllamaModel has none there: .*"
            r"cross-attention layers \[1, 3\] \(stage llm, cross-attention methods only: trimmed_llama\)",
        ),
        ("divprune", {}, r"method 'divprune' acts at stage pre_llm; this model has stages llm"),
        ("tome", {}, r"method 'tome' acts at stage encoder; this model has stages llm"),
        ("trimmed_llama", dict(keep_ratio=0.0), r"keep_ratio must be a number in \(0, 1\], got 0.0"),
    ],
)
def test_refusals_on_mllama(model, method, config, match):
    with pytest.raises((TypeError, ValueError), match=match):
        tokenreduce.apply(model, method, **config)
    assert not tokenreduce.is_patched(model)


def test_trimmed_llama_refused_where_visual_tokens_are_in_the_sequence():
    with pytest.raises(TypeError, match=r"'trimmed_llama' trims the image features that cross-attention layers read"):
        tokenreduce.apply(tiny_llava(), "trimmed_llama")


def test_static_cache_refused(model):
    kw = mllama_inputs(TEXTS[:1], TILES[:1])
    with tokenreduce.applied(model, "trimmed_llama"):
        with pytest.raises(ValueError, match="needs a dynamic cache"), torch.no_grad():
            model.generate(**kw, max_new_tokens=2, do_sample=False, cache_implementation="static")


def test_describe_names_the_cross_attention_layers(model):
    with tokenreduce.applied(model, "trimmed_llama", keep_ratio=0.3):
        text = tokenreduce.describe(model)
    assert "via adapter 'hf-mllama'" in text
    assert "image features read by cross-attention layers 1, 3: chosen at layer 1; each head keeps the top 0.3" in text


def test_attention_implementation_kept_and_eager_agrees():
    kw = mllama_inputs(TEXTS, TILES)
    sdpa, eager = tiny_mllama(), tiny_mllama()
    eager.set_attn_implementation("eager")
    for model in (sdpa, eager):
        tokenreduce.apply(model, "trimmed_llama", keep_ratio=0.25)
    assert sdpa.config.text_config._attn_implementation == "sdpa"
    (sdpa_logits, sdpa_tokens), (eager_logits, eager_tokens) = run(sdpa, kw), run(eager, kw)
    real = kw["attention_mask"].bool()  # padding rows attend nothing: each kernel fills them its own way
    torch.testing.assert_close(eager_logits[real], sdpa_logits[real], rtol=1e-4, atol=1e-4)
    assert torch.equal(eager_tokens, sdpa_tokens)


def test_head_received_attention_sums_each_heads_softmax_over_the_chosen_queries():
    from tokenreduce.core import attention_probs, head_received_attention

    g = torch.Generator().manual_seed(0)
    q, k, bias = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 7, 4, generator=g), torch.randn(2, 1, 5, 7, generator=g)
    queries = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    want = (attention_probs(q, k, 0.5, bias) * queries[:, None, :, None]).sum(dim=2)
    torch.testing.assert_close(head_received_attention(q, k, 0.5, bias, queries), want)
    torch.testing.assert_close(head_received_attention(q, k, 0.5), attention_probs(q, k, 0.5).sum(dim=2))


def test_without_a_cross_attention_mask_one_row_reads_everything_and_a_batch_is_refused(model):
    kw = {k: v for k, v in mllama_inputs(TEXTS, TILES).items() if k != "cross_attention_mask"}
    one = {k: v[1:] for k, v in kw.items()}
    with tokenreduce.applied(model, "trimmed_llama", keep_ratio=0.25):
        with torch.no_grad():
            model(**one)
        assert len(tokenreduce.record(model).kept[0]) >= round(0.25 * 34)
        with pytest.raises(ValueError, match="needs its cross_attention_mask"), torch.no_grad():
            model(**kw)
