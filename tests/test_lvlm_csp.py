"""LVLM_CSP inside the LLM (cluster, scatter back, prune): generate() and the picks against a slow
layer-by-layer reference applying the naive stages by hand, the per-layer KV cache, keep-all
identity, batches against rows alone and remove() (every VLM family), config errors."""

from __future__ import annotations

import pytest
import torch

import naive_llm_layers
import naive_lvlm_csp
import tokenreduce
from conftest import (
    VLM_FAMILIES,
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

CONFIG = dict(layers=(1, 2, 3), cluster_ratio=0.25, keep_ratio=0.25)  # 16 -> 4 before 1, 16 before 2, 4 before 3
START, N = 3, 16  # the prompt [1, 5, 6, 16 image tokens, 7, 8]


def reference(base, clustering: str, positions: str, picks: list):
    """The three stages by hand on one unpadded prompt, for :func:`naive_llm_layers.generate`; each
    stage's tokens (indices in the image) go to ``picks``."""
    (a, b, c), saved = CONFIG["layers"], {}

    def cut(hidden, pos, image):
        keep = [*range(START), *(START + i for i in image), *range(START + N, hidden.shape[0])]
        return hidden[keep], torch.arange(len(keep)) if positions == "reindex" else pos[keep]

    def reduce(layer, hidden, pos, inputs):
        if layer == a:
            reps = naive_lvlm_csp.representatives(N, round(CONFIG["cluster_ratio"] * N), clustering)
            saved.update(hidden=hidden, pos=pos, reps=reps, assign=naive_lvlm_csp.clusters(hidden[START : START + N], reps))
            picks.append(reps)
            hidden, pos = cut(hidden, pos, reps)
            return hidden, pos
        if layer == b:
            k = len(saved["reps"])
            full = saved["hidden"].clone()
            full[:START], full[START + N :] = hidden[:START], hidden[START + k :]
            image = saved["hidden"][START : START + N]
            full[START : START + N] = naive_lvlm_csp.scatter(image, saved["reps"], saved["assign"], hidden[START : START + k])
            picks.append(list(range(N)))
            return full, saved["pos"]
        if layer == c:
            q, k, scale = naive_llm_layers.queries_keys(base, c - 1, *inputs[c - 1])
            scores = naive_lvlm_csp.last_token_attention(q, k, scale)[START : START + N]
            kept = naive_lvlm_csp.prune(scores, round(CONFIG["keep_ratio"] * N))
            picks.append(kept)
            return cut(hidden, pos, kept)
        return hidden, pos

    return reduce


@pytest.mark.parametrize(
    "clustering, positions, attention",
    [("uniform", "keep", "sdpa"), ("uniform", "keep", "eager"), ("random", "keep", "sdpa"), ("uniform", "reindex", "sdpa")],
)
def test_generate_and_picks_equal_the_layerwise_reference(clustering, positions, attention):
    kw = dict(input_ids=torch.tensor([prompt([1, 5, 6])]), pixel_values=pixels(1))
    model = tiny_llava()
    model.set_attn_implementation(attention)
    tokenreduce.apply(model, "lvlm_csp", **CONFIG, clustering=clustering, positions=positions)
    got, got_logits = vlm_generate(model, kw, 4), vlm_logits(model, kw)[0, -1]
    rec = tokenreduce.record(model)
    base, picks = tiny_llava(), []
    base.set_attn_implementation("eager")
    with torch.no_grad():
        want, want_logits = naive_llm_layers.generate(base, kw, reference(base, clustering, positions, picks), 4)
    assert [s.layer for s in rec.steps] == [1, 2, 3] and [s.kept[0].tolist() for s in rec.steps] == picks
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    assert got[0].tolist() == want


def test_the_cache_holds_the_clustered_layers_short_and_the_scattered_ones_whole():
    kw = dict(input_ids=torch.tensor([prompt([1, 5, 6])]), pixel_values=pixels(1))
    model = tokenreduce.apply(tiny_llava(), "lvlm_csp", **CONFIG)
    with torch.no_grad():
        out = model(**kw, use_cache=True)
    assert [layer.keys.shape[2] for layer in out.cache.layers] == [21, 9, 21, 9]
    image = tokenreduce.record(model).images[0]
    assert image.kept == 4 and int((image.owner >= 0).sum()) == 4
    assert "pruned before LLM layers 1, 3 of 4: 16 -> 4 -> 4; layer 1's input comes back before layer 2" in tokenreduce.describe(
        model
    )


def test_keeping_every_token_equals_the_unpatched_model():
    model = tiny_vlm("llava")
    kw = vlm_inputs(model, "llava", [[1, 5], [1, 5, 6, 9, 4]])
    want, want_gen = vlm_logits(model, kw), vlm_generate(model, kw)
    tokenreduce.apply(model, "lvlm_csp", layers=(1, 2, 3), cluster_ratio=1.0, keep_ratio=1.0)
    assert torch.equal(vlm_logits(model, kw), want) and torch.equal(vlm_generate(model, kw), want_gen)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_batch_equals_singles_and_remove_restores(family):
    clustering = "random" if family == "llava_next" else "uniform"
    rec = reduce_batch_and_singles(family, "lvlm_csp", **CONFIG, clustering=clustering)
    n = rec.images[0].placeholders
    assert all(im.kept == max(1, round(n * 0.25)) for im in rec.images)
    text = rec.input_lengths[-1] - n
    short = text + max(1, round(n * 0.25))
    assert [lengths[-1] for lengths in rec.layer_lengths] == [text + n, short, text + n, short]


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(layers=(1, 2)), r"layers must be 3 increasing layer indices \(cluster, scatter, prune\), got \(1, 2\)"),
        (dict(layers=(2, 1, 3)), r"layers must be 3 increasing layer indices"),
        (dict(layers=(0, 1, 2)), r"layers\[0\] must be an integer >= 1, got 0"),
        (dict(layers=(1, 2, 4)), r"layers must be in \[1, 3\] for an LLM of 4 layers, got 4"),
        (dict(cluster_ratio=0.0), r"cluster_ratio must be a number in \(0, 1\], got 0.0"),
        (dict(keep_ratio=1.5), r"keep_ratio must be a number in \(0, 1\], got 1.5"),
        (dict(clustering="cls"), r"clustering must be one of \('uniform', 'random'\), got 'cls'"),
        (dict(seed=-1), r"seed must be an integer >= 0, got -1"),
    ],
)
def test_bad_config_raises_with_range(config, match):
    model = tiny_llava()
    with pytest.raises(ValueError, match=match):
        tokenreduce.apply(model, "lvlm_csp", **config)
    assert not tokenreduce.is_patched(model)


def test_a_restore_must_follow_its_pruning_layer():
    from tokenreduce.methods.lvlm_csp import LVLMCSP

    class Backwards(LVLMCSP):
        def restore_layers(self, depth: int) -> dict[int, int]:
            return {3: 2}

    model = tiny_llava()
    with pytest.raises(ValueError, match=r"a restoring layer must follow its pruning layer .* got 3 -> 2"):
        tokenreduce.apply(model, Backwards(layers=(1, 2, 3)))
    assert not tokenreduce.is_patched(model)
