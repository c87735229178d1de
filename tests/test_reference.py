"""Each method against an independent naive implementation of its paper's algorithm."""

from __future__ import annotations

import pytest
import torch

import reference
import tokenreduce
from conftest import build, images, layout, output
from tokenreduce.core import bipartite_soft_matching


@pytest.mark.parametrize("prefix", [0, 1, 2, 5])
@pytest.mark.parametrize("n", [17, 24])
def test_bipartite_matching_matches_naive(prefix, n):
    gen = torch.Generator().manual_seed(n * 10 + prefix)
    x = torch.randn(3, n, 8, generator=gen)
    metric = torch.randn(3, n, 6, generator=gen)
    size = torch.randint(1, 5, (3, n, 1), generator=gen).float()
    for r in [1, (n - prefix) // 4, (n - prefix) // 2]:
        match = bipartite_soft_matching(metric, r, prefix, size)
        got_x, got_size = match.apply(x), match.sizes(size)
        for b in range(3):
            want_x, want_size = reference.tome_merge(x[b], metric[b], size[b, :, 0], r, prefix)
            torch.testing.assert_close(got_x[b], want_x, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got_size[b, :, 0], want_size)


@pytest.mark.parametrize("model_name", ["vit", "dinov2_reg", "qknorm_avg", "no_cls_avg"])
@pytest.mark.parametrize("prop_attn", [True, False])
def test_tome_model_matches_reference(model_name, prop_attn):
    model, x = build(model_name), images(batch=3)
    r = [5, 8, 3, 6]
    prefix = model.num_prefix_tokens

    def step(layer, t, k, probs, size):
        return reference.tome_merge(t, k.mean(0), size, r[layer], prefix)

    want = reference.vit_forward(model, x, step, prop_attn=prop_attn)
    tokenreduce.apply(model, "tome", r=r, prop_attn=prop_attn)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_name", ["vit", "dinov2_reg", "qknorm_avg"])
@pytest.mark.parametrize("method", ["evit", "topk"])
def test_cls_attention_pruning_matches_reference(model_name, method):
    model, x = build(model_name, depth=6), images(batch=3)
    prefix, layers, keep_rate = model.num_prefix_tokens, (1, 3, 4), 0.55

    def step(layer, t, k, probs, size):
        if layer not in layers:
            return t, size
        return reference.evit_step(t, size, probs[:, 0].mean(0), keep_rate, prefix, fuse=method == "evit")

    want = reference.vit_forward(model, x, step, prop_attn=False)
    tokenreduce.apply(model, method, keep_rate=keep_rate)  # default layers scaled to depth 6: 1, 3, 4
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_name", ["hf_clip", "hf_siglip", "hf_dinov2", "hf_vit"])
def test_tome_on_hf_towers_matches_reference(model_name):
    model, x = build(model_name), images(batch=3)
    r, prefix = [5, 8, 3, 6], layout(model)[1]

    def step(layer, t, k, probs, size):
        return reference.tome_merge(t, k.mean(0), size, r[layer], prefix)

    want = reference.hf_tower_forward(model, x, step)
    tokenreduce.apply(model, "tome", r=r)
    torch.testing.assert_close(output(model, x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_name", ["hf_clip", "hf_dinov2"])
def test_evit_on_hf_towers_matches_reference(model_name):
    model, x = build(model_name), images(batch=3)
    prefix, layers, keep_rate = 1, (1, 2), 0.55

    def step(layer, t, k, probs, size):
        if layer not in layers:
            return t, size
        return reference.evit_step(t, size, probs[:, 0].mean(0), keep_rate, prefix, fuse=True)

    want = reference.hf_tower_forward(model, x, step, prop_attn=False)
    tokenreduce.apply(model, "evit", keep_rate=keep_rate, layers=layers)
    torch.testing.assert_close(output(model, x), want, rtol=1e-4, atol=1e-4)
