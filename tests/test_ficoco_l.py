"""FiCoCo-L inside the LLM: the tokens a layer reads against naive loops, generate() against a slow
layer-by-layer reference, keep-all identity, batches against rows alone and remove() (every VLM
family), config errors."""

from __future__ import annotations

import pytest
import torch
from test_llm_pruning import llava_inputs

import naive_ficoco
import naive_llm_layers
import tokenreduce
from conftest import (
    IMAGE_TOKEN,
    VLM_FAMILIES,
    batch,
    pixels,
    prompt,
    reduce_batch_and_singles,
    tiny_llava,
    tiny_vlm,
    vlm_generate,
    vlm_inputs,
    vlm_logits,
)

pytest.importorskip("transformers")

STAGED = dict(step=0.25, keep_ratio=0.25)  # 16 -> 12 -> 8 -> 4 before layers 1, 2, 3


def naive_stage(base, hidden: torch.Tensor, start: int, n: int, keep: int, layer: int, scoring: tuple, quantile: float = 0.998):
    """One naive FiCoCo-L stage before ``layer`` on one row's real tokens: ``hidden [L, D]`` entering
    it, the image at ``[start, start + n)``, ``scoring`` the previous layer's ``(input, positions)``."""
    with torch.no_grad():
        q, k, scale = naive_llm_layers.queries_keys(base, layer - 1, *scoring)
    tokens = list(range(start, hidden.shape[0]))  # the image, then the text after it
    kept, outputs = naive_ficoco.ficoco_l(hidden[start : start + n], q[:, tokens], k[:, tokens], scale, keep, quantile=quantile)
    return kept, torch.tensor(outputs)


@pytest.mark.parametrize("quantile", [0.998, 0.7])
def test_the_layer_reads_the_naive_loops_tokens(quantile):
    base, kw = tiny_llava(), llava_inputs()
    model = tokenreduce.apply(tiny_llava(), "ficoco_l", layer=2, step=1.0, keep_ratio=0.25, quantile=quantile)
    seen = []
    hook = model.model.language_model.layers[2].input_layernorm.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    vlm_logits(model, kw)
    hook.remove()
    kept = tokenreduce.record(model).steps[0].kept
    with torch.no_grad():
        states = base(**kw, output_hidden_states=True).hidden_states  # [i]: layer i's input
    for row in range(2):
        real = kw["attention_mask"][row].bool()
        start = int((kw["input_ids"][row][real] == IMAGE_TOKEN).nonzero()[0])
        positions = torch.arange(kw["input_ids"].shape[1])[real]  # a forward without ids counts every column
        want_kept, want = naive_stage(base, states[2][row][real], start, 16, 4, 2, (states[1][row][real], positions), quantile)
        assert kept[row].tolist() == want_kept
        where = seen[0].shape[1] - 2 - 4  # left padded: [pad, text, 4 image tokens, 7, 8]
        torch.testing.assert_close(seen[0][row, where : where + 4], want, rtol=1e-4, atol=1e-5)


def test_generate_equals_the_layerwise_reference():
    kw = dict(input_ids=torch.tensor([prompt([1, 5, 6])]), pixel_values=pixels(1))
    base = tiny_llava()
    base.set_attn_implementation("eager")
    model = tokenreduce.apply(tiny_llava(), "ficoco_l", **STAGED)
    got, got_logits = vlm_generate(model, kw, 4), vlm_logits(model, kw)[0, -1]
    start, keeps = 3, {1: 12, 2: 8, 3: 4}
    length = {"n": 16}

    def reduce(layer, hidden, positions, inputs):
        if layer not in keeps:
            return hidden, positions
        _, tokens = naive_stage(base, hidden, start, length["n"], keeps[layer], layer, inputs[layer - 1])
        hidden = torch.cat([hidden[:start], tokens, hidden[start + length["n"] :]])
        length["n"] = keeps[layer]
        return hidden, torch.arange(hidden.shape[0])  # re-indexed, as the code's truncated position ids

    want, want_logits = naive_llm_layers.generate(base, kw, reduce, 4)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    assert got[0].tolist() == want


def test_keeping_every_token_equals_the_unpatched_model():
    model = tiny_vlm("llava")
    kw = vlm_inputs(model, "llava", [[1, 5], [1, 5, 6, 9, 4]])
    want, want_gen = vlm_logits(model, kw), vlm_generate(model, kw)
    tokenreduce.apply(model, "ficoco_l", keep_ratio=1.0)
    assert torch.equal(vlm_logits(model, kw), want) and torch.equal(vlm_generate(model, kw), want_gen)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_batch_equals_singles_and_remove_restores(family):
    rec = reduce_batch_and_singles(family, "ficoco_l", **STAGED)
    n = rec.images[0].placeholders
    assert all(im.kept == max(1, round(n * 0.25)) for im in rec.images)
    assert [s.layer for s in rec.steps] == [1, 2, 3]


def test_text_after_the_image_is_required():
    model = tokenreduce.apply(tiny_llava(), "ficoco_l", **STAGED)
    ids, _ = batch([[1, 5, *[IMAGE_TOKEN] * 16]])
    with pytest.raises(ValueError, match=r"ficoco_l rates each image by the text after it; image 0 \(row 0\) has none"):
        vlm_logits(model, dict(input_ids=ids, pixel_values=pixels(1)))


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(layer=0), r"layer must be an integer >= 1, got 0"),
        (dict(layer=4), r"layer must be in \[1, 3\] for an LLM of 4 layers, got 4"),
        (dict(step=0.0), r"step must be a number in \(0, 1\], got 0.0"),
        (dict(keep_ratio=1.5), r"keep_ratio must be a number in \(0, 1\], got 1.5"),
        (dict(beta=-0.1), r"beta must be a number in \[0, 1\], got -0.1"),
        (dict(alpha=2), r"alpha must be a number in \[0, 1\], got 2"),
        (dict(quantile=1.5), r"quantile must be a number in \[0, 1\], got 1.5"),
        (dict(positions="shift"), r"positions must be one of"),
    ],
)
def test_bad_config_raises_with_range(config, match):
    model = tiny_llava()
    with pytest.raises(ValueError, match=match):
        tokenreduce.apply(model, "ficoco_l", **config)
    assert not tokenreduce.is_patched(model)
