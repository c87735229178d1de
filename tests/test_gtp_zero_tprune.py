"""GTP-ViT (``gtp``) and Zero-TPrune (``zero_tprune``) against naive oracles, their DeiT-S schedules and
costs, identities and config errors."""

from __future__ import annotations

import math

import pytest
import torch

import naive_gtp_zero_tprune
import tokenreduce
from conftest import build, images, output, use_eager_attention
from tokenreduce.core import (
    graph_propagation,
    grid_adjacency,
    head_rms,
    knn_adjacency,
    normalized_adjacency,
    redundant_half,
    stable_order,
    weighted_pagerank,
    zero_smallest,
)

TIMM = ["vit", "dinov2_reg", "qknorm_avg", "no_cls_avg", "deit_distilled"]


def deit_s_gmacs(entering: list[int], leaving: list[int], end_hook: bool = False) -> float:
    """The spec's analytic DeiT-S model: per block 4·Na·C² + 2·Na²·C + 8·Nm·C², Na the tokens entering
    attention, Nm those entering the MLP (the tokens leaving, or entering when the reduction is after it)."""
    c = 384
    total = 196 * 768 * c + c * 1000
    for na, out in zip(entering, leaving):
        nm = na if end_hook else out
        total += 4 * na * c * c + 2 * na * na * c + 8 * nm * c * c
    return total / 1e9


# ---------------------------------------------------------------------------------------------- GTP


@pytest.mark.parametrize("sparsity", [0.6, 1.0])
@pytest.mark.parametrize("model_name", TIMM)
def test_gtp_model_matches_naive(model_name, sparsity):
    model, x = build(model_name), images(batch=3)
    num_prop = [3, 5, 0, 4]
    want = naive_gtp_zero_tprune.gtp_forward(model, x, num_prop, sparsity, 0.1)
    use_eager_attention(model)
    tokenreduce.apply(model, "gtp", num_prop=num_prop, sparsity=sparsity)
    torch.testing.assert_close(output(model, x), want, rtol=1e-5, atol=1e-5)
    assert tokenreduce.record(model).tokens_per_layer == tuple(64 + model.num_prefix_tokens - s for s in (3, 8, 8, 12))


@pytest.mark.parametrize(
    "config",
    [
        dict(graph="spatial", alpha=0.3),
        dict(graph="semantic", num_neighbours=3),
        dict(token_scale=False, sparsity=0.4),
        dict(sparsity=0.999),  # int(65 * 65 * 0.001) = 4 entries per map
        dict(sparsity=0.9999),  # k = 0: nothing zeroed (the reference's kthvalue would fail)
    ],
)
def test_gtp_variants_match_naive(config):
    model, x = build("qknorm_avg"), images(batch=2)
    full = dict(sparsity=0.6, alpha=0.1, num_neighbours=8, token_scale=True, graph="mixed") | config
    want = naive_gtp_zero_tprune.gtp_forward(
        model, x, [4] * 4, full["sparsity"], full["alpha"], full["num_neighbours"], full["token_scale"], full["graph"]
    )
    use_eager_attention(model)
    tokenreduce.apply(model, "gtp", num_prop=4, **config)
    torch.testing.assert_close(output(model, x), want, rtol=1e-5, atol=1e-5)


def test_gtp_on_a_non_square_grid():
    model, x = build("vit", dynamic_img_size=True), images(batch=2)[:, :, :, :24]  # 8 x 6 patches
    x = torch.cat([x, x.flip(-1)], dim=-1)[:, :, :, :48]  # 32 x 48 px: 8 x 12 patches
    want = naive_gtp_zero_tprune.gtp_forward(model, x, [4] * 4, 0.6, 0.1, grid=(8, 12))
    use_eager_attention(model)
    tokenreduce.apply(model, "gtp", num_prop=4, grid=(8, 12))
    torch.testing.assert_close(output(model, x), want, rtol=1e-5, atol=1e-5)
    tokenreduce.apply(model, "gtp", num_prop=4)
    with pytest.raises(ValueError, match=r"96 patch tokens are not a square grid; pass grid=\(rows, cols\)"):
        output(model, x)
    tokenreduce.apply(model, "gtp", num_prop=4, graph="semantic")  # needs no grid
    assert output(model, x).shape == (2, 10)


def test_gtp_identity_and_sparsity_only():
    model, x = build("vit"), images()
    want = output(model, x)
    with tokenreduce.applied(model, "gtp", num_prop=0, sparsity=1.0):
        assert torch.equal(output(model, x), want)  # SDPA blocks, nothing selected
    with tokenreduce.applied(model, "gtp", num_prop=0, sparsity=0.6):
        sparse = output(model, x)
        assert tokenreduce.record(model).tokens_per_layer == (65,) * 4
    assert not torch.allclose(sparse, want, atol=1e-3)  # sparsity alone changes the model, as in the paper


def test_gtp_edits_attention_only_when_sparsified():
    assert tokenreduce.make_method("gtp").edits_attention
    dense = tokenreduce.make_method("gtp", sparsity=1.0)
    assert not dense.edits_attention and dense.prop_attn
    assert not tokenreduce.make_method("gtp", token_scale=False).prop_attn
    model, x = build("dinov2_reg"), images()
    tokenreduce.apply(model, dense)
    fused = output(model, x)
    use_eager_attention(model)
    torch.testing.assert_close(output(model, x), fused, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p,gmacs", [(4, 4.00), (8, 3.42), (10, 3.13), (14, 2.56)])
def test_gtp_deit_s_counts_and_gmacs(p, gmacs):
    plan = tokenreduce.make_method("gtp", num_prop=p).schedule(197, 1, 12)
    assert plan == [197 - p * (i + 1) for i in range(12)] and plan[-1] == 197 - 12 * p
    assert round(deit_s_gmacs([197, *plan[:-1]], plan), 2) == gmacs


def test_gtp_default_is_p8_on_deit_s_and_plans_everywhere():
    assert tokenreduce.make_method("gtp").per_block_prop(196, 12) == [8] * 12
    assert tokenreduce.make_method("gtp").per_block_prop(196, 24) == [4] * 24  # ViT-L
    assert tokenreduce.make_method("gtp").per_block_prop(1369, 12) == [57] * 12  # DINOv2 at 518 px
    assert tokenreduce.make_method("gtp").per_block_prop(256, 32) == [4] * 32  # ViT-H/14


def test_gtp_sizes_are_token_scales():
    model, x = build("vit"), images()
    tokenreduce.apply(model, "gtp", num_prop=4, alpha=0.5)
    output(model, x)
    rec = tokenreduce.record(model)
    assert torch.equal(rec.size[:, 0, 0], torch.ones(2))  # the class token's scale never changes
    assert (rec.size[:, 1:, 0] >= 1).all() and (rec.size[:, 1:, 0] > 1).any()


@pytest.mark.parametrize("descending", [True, False])
def test_stable_order_is_a_stable_sort(descending):
    scores = torch.randint(0, 5, (3, 40), generator=torch.Generator().manual_seed(0)).float()
    scores[0, 7] = -math.inf
    want = scores.sort(dim=1, descending=descending, stable=True).indices
    assert torch.equal(stable_order(scores, descending), want)


def test_zero_smallest_matches_naive():
    probs = torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(0)).softmax(dim=-1)
    for count in [0, 1, 30, 41, 70, 81]:
        got = zero_smallest(probs, count)
        for b in range(2):
            for h in range(3):
                values = sorted(probs[b, h].flatten().tolist())
                want = probs[b, h].clone()
                if count:
                    want[want < values[count - 1]] = 0.0
                assert torch.equal(got[b, h], want)
    with pytest.raises(ValueError, match=r"count must be in \[0, 81\]"):
        zero_smallest(probs, 82)


def test_core_gtp_steps_match_naive():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 22, 5, generator=gen)  # 2 prefix tokens, 20 patches on a 4 x 5 grid
    graph = normalized_adjacency(torch.maximum(grid_adjacency(4, 5).expand(2, -1, -1), knn_adjacency(x[:, 2:], 3)))
    rank = torch.rand(2, 20, generator=gen)
    rank[:, 3:9] = 0.0  # ties: position order decides
    selection, sub = graph_propagation(rank, graph, 7, 0.2, 2)
    got, sizes = selection.apply(x), selection.sizes(torch.ones(2, 22, 1))
    for b in range(2):
        naive_graph = naive_gtp_zero_tprune.gtp_graph(x[b, 2:], 4, 5, 3, "mixed")
        torch.testing.assert_close(graph[b], torch.tensor(naive_graph), rtol=1e-6, atol=1e-7)
        want, scales, want_graph = naive_propagate_by_rank(x[b], rank[b].tolist(), naive_graph, 7, 0.2, 2)
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sizes[b, :, 0], torch.tensor(scales).float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sub[b], torch.tensor(want_graph), rtol=1e-6, atol=1e-7)


def naive_propagate_by_rank(t, rank, graph, num_prop, alpha, prefix):
    """``naive_gtp_zero_tprune.gtp_propagate`` with a given rank: a map whose diagonal is the rank and columns sum to 1."""
    n = t.shape[0]
    probs = torch.zeros(1, n, n, dtype=torch.float64)
    for i in range(prefix, n):
        probs[0, i, i] = rank[i - prefix]
        probs[0, (i + 1) % n, i] = 1 - rank[i - prefix]
    return naive_gtp_zero_tprune.gtp_propagate(t, [1.0] * n, graph, probs, num_prop, alpha, prefix)


def test_gtp_dense_restore_is_the_neighbour_average():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 17, 4, generator=gen)
    graph = normalized_adjacency(grid_adjacency(4, 4)).expand(1, -1, -1)
    selection, _ = graph_propagation(torch.rand(1, 16, generator=gen), graph, 5, 0.1, 1)
    y = selection.apply(x)
    back = selection.unmerge(y)
    kept = selection.index[0, 1:] - 1
    for j in range(16):
        if j in kept.tolist():
            torch.testing.assert_close(back[0, j + 1], y[0, 1 + kept.tolist().index(j)])
        else:  # a propagated token: the kept tokens it fed, weighted by its edges to them
            w = graph[0, kept, j]
            torch.testing.assert_close(back[0, j + 1], (w[:, None] * y[0, 1:]).sum(0) / w.sum())


@pytest.mark.parametrize(
    "config,match",
    [
        (dict(num_prop=-1), r"num_prop must be an integer >= 0, got -1"),
        (dict(num_prop=2, keep_ratio=0.5), "pass num_prop or keep_ratio, not both"),
        (dict(keep_ratio=0.0), r"keep_ratio must be a number in \(0, 1\]"),
        (dict(sparsity=0.0), r"sparsity must be a number in \(0, 1\]"),
        (dict(sparsity=1.2), r"sparsity must be a number in \(0, 1\]"),
        (dict(alpha=-0.1), r"alpha must be a number >= 0"),
        (dict(num_neighbours=-1), r"num_neighbours must be an integer >= 0"),
        (dict(graph="grid"), r"graph must be one of \('mixed', 'spatial', 'semantic'\)"),
        (dict(grid=(8,)), r"grid must be \(rows, cols\)"),
        (dict(grid=(0, 8)), r"grid\[0\] must be an integer >= 1"),
    ],
)
def test_gtp_bad_configs_raise(config, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tokenreduce.make_method("gtp", **config)


@pytest.mark.parametrize(
    "config,match",
    [
        (dict(num_prop=[1, 2]), r"num_prop as a list must have one entry per block \(4\), got 2"),
        (dict(num_prop=16), r"propagates 64 tokens in all; at most 63 of the 64 patch tokens may go"),
        (dict(num_prop=2, num_neighbours=64), r"num_neighbours must be in \[0, 63\] for 64 patch tokens, got 64"),
        (dict(num_prop=2, grid=(4, 8)), r"grid=\(4, 8\) does not hold the 64 patch tokens"),
    ],
)
def test_gtp_configs_that_do_not_fit_the_model_raise(config, match):
    with pytest.raises(ValueError, match=match):
        tokenreduce.apply(build("vit"), "gtp", **config)


# -------------------------------------------------------------------------------------- Zero-TPrune


def zero_tprune_naive(model, x, method):
    depth, p = len(model.blocks), model.num_prefix_tokens
    plan, layers = method.schedule(64 + p, p, depth), method.reduction_layers(depth)

    def step(layer, t, k, probs):
        if layer not in layers:
            return t
        kept = plan[layer] - p
        r = method.similarity_drops(t.shape[0] - p, kept)
        return naive_gtp_zero_tprune.zero_tprune_step(
            t, k, probs, p, kept, r, method.iterations_at(layer, depth), method.uniform_init, method.head_variance
        )

    return naive_gtp_zero_tprune.vit_forward_end(model, x, step)


@pytest.mark.parametrize("model_name", TIMM)
def test_zero_tprune_model_matches_naive(model_name):
    model, x = build(model_name), images(batch=3)
    method = tokenreduce.make_method("zero_tprune")
    want = zero_tprune_naive(model, x, method)
    tokenreduce.apply(model, method)
    torch.testing.assert_close(output(model, x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "config",
    [
        dict(uniform_init=True),
        dict(similarity_share=0.0),  # I-stage only
        dict(similarity_share=1.0, keep_rate=0.5),  # S-stage only: it drops the whole less important half
        dict(head_variance=None, iterations=(7, 3, 2)),
        dict(layers=(1, 3), keep_rate=0.6),
    ],
)
def test_zero_tprune_variants_match_naive(config):
    model, x = build("dinov2_reg", depth=6), images(batch=2)
    method = tokenreduce.make_method("zero_tprune", **config)
    want = zero_tprune_naive(model, x, method)
    tokenreduce.apply(model, method)
    torch.testing.assert_close(output(model, x), want, rtol=1e-5, atol=1e-5)


def test_zero_tprune_deit_s_setting():
    method = tokenreduce.make_method("zero_tprune")
    plan = method.schedule(197, 1, 12)
    assert method.reduction_layers(12) == (2, 5, 8)
    assert plan == [197] * 2 + [143] * 3 + [104] * 3 + [76] * 4
    gmacs = deit_s_gmacs([197, *plan[:-1]], plan, end_hook=True)
    assert round(gmacs, 2) == 2.99 and abs((1 - gmacs / 4.598882) - 0.347) < 0.005  # Zero-TP-a: -34.7%
    assert [method.iterations_at(i, 12) for i in (2, 5, 8)] == [30, 5, 1]  # shallow, middle, deep
    assert [method.similarity_drops(m, k) for m, k in ((196, 142), (142, 103), (103, 75))] == [27, 19, 14]
    assert method.reduction_layers(24) == (5, 11, 17) and method.reduction_layers(4) == (0, 1, 2)


def test_zero_tprune_identity():
    model, x = build("dinov2_reg"), images()
    want = output(model, x)
    with tokenreduce.applied(model, "zero_tprune", keep_rate=1.0):
        assert torch.equal(output(model, x), want)


def test_core_zero_tprune_steps_match_naive():
    gen = torch.Generator().manual_seed(2)
    probs = torch.randn(2, 4, 13, 13, generator=gen).mul(2).softmax(dim=-1)
    keys = torch.randn(2, 4, 13, 6, generator=gen)
    alive = torch.ones(2, 13, dtype=torch.bool)
    alive[0, [3, 7]] = False
    alive[1, [1, 12]] = False
    scores = weighted_pagerank(probs, 9, alive, first_weight=math.sqrt(11))
    for variance in [None, (0.05, 0.5)]:
        agg = head_rms(scores, alive, variance)
        for b in range(2):
            keep = [i for i in range(13) if alive[b, i]]
            per_head = naive_gtp_zero_tprune.wpr(probs[b], keep, 9, cls_first=True)
            for h, s in enumerate(per_head):
                torch.testing.assert_close(scores[b, h, keep], torch.tensor([s[i] for i in keep]).float(), rtol=1e-4, atol=1e-7)
                assert (scores[b, h, ~alive[b]] == 0).all()
            want = naive_gtp_zero_tprune.aggregate(per_head, variance)
            torch.testing.assert_close(agg[b, keep], torch.tensor([want[i] for i in keep]).float(), rtol=1e-4, atol=1e-7)
    importance = torch.rand(2, 12, generator=gen)
    dropped = redundant_half(keys.mean(1), importance, 4, num_prefix=1)
    for b in range(2):
        unit = keys[b].mean(0) / keys[b].mean(0).norm(dim=-1, keepdim=True)
        order = sorted(range(1, 13), key=lambda i: importance[b, i - 1].item())
        a, bb = order[:6], order[6:]
        best = {i: max(float(unit[i] @ unit[j]) for j in bb) for i in a}
        assert dropped[b].tolist() == sorted(a, key=lambda i: -best[i])[:4]


@pytest.mark.parametrize(
    "config,match",
    [
        (dict(keep_rate=0.0), r"keep_rate must be a number in \(0, 1\]"),
        (dict(iterations=(30, 5)), r"iterations must be three counts >= 1"),
        (dict(iterations=(30, 0, 1)), r"iterations\[1\] must be an integer >= 1"),
        (dict(similarity_share=1.5), r"similarity_share must be a number in \[0, 1\]"),
        (dict(head_variance=(0.7, 0.01)), r"head_variance must be \(low, high\) with 0 <= low <= high"),
        (dict(uniform_init=1), "uniform_init must be True or False"),
        (dict(layers=()), "layers must be a non-empty sequence"),
    ],
)
def test_zero_tprune_bad_configs_raise(config, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tokenreduce.make_method("zero_tprune", **config)


def test_zero_tprune_similarity_share_beyond_the_half_raises():
    with pytest.raises(ValueError, match=r"drop 38 of 64 tokens, more than the 32 of its less important half"):
        tokenreduce.apply(build("vit"), "zero_tprune", keep_rate=0.4, similarity_share=1.0)
    with pytest.raises(ValueError, match=r"layers must be block indices in \[0, 3\]"):
        tokenreduce.apply(build("vit"), "zero_tprune", layers=(1, 4))
