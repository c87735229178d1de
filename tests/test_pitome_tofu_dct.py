"""PiToMe, ToFu and DCT: naive oracles (tests/naive_pitome_tofu_dct.py) step by step and through whole models, the
reference's token counts and costs, the reference quirks behind options, and config errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import naive_pitome_tofu_dct
import reference
import tokenreduce
from conftest import build, images, output, use_eager_attention
from tokenreduce.adapters import locate
from tokenreduce.bench import model_macs
from tokenreduce.core import bipartite_merge, dct_lowpass, dct_matrix, keep, rescale_to_max_norm
from tokenreduce.methods.base import Hook, LayerContext


def step_inputs(n: int, seed: int, sizes: bool = True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, n, 8, generator=gen)
    metric = torch.randn(3, n, 6, generator=gen)
    size = torch.randint(1, 5, (3, n, 1), generator=gen).float() if sizes else torch.ones(3, n, 1)
    return x, metric, size


def run_select(method, x, metric, size, layer, depth, prefix, num_out):
    ctx = LayerContext(layer, prefix, num_out, None, metric[:, None], 1.0, None, size, depth=depth)
    selection = method.select(x, ctx)
    return selection.apply(x), selection.sizes(size), selection


def gmacs(schedule: list[int], start: int, width: int = 384, at_end: bool = False) -> float:
    """The spec's analytic DeiT-S cost: per block 4*Na*C^2 + 2*Na^2*C + 8*Nm*C^2, plus embedding and head."""
    total, n = 196 * 768 * width + width * 1000, start
    for after in schedule:
        mlp = n if at_end else after
        total += 4 * n * width**2 + 2 * n * n * width + 8 * mlp * width**2
        n = after
    return total / 1e9


# -- PiToMe ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("layer", [0, 3])  # depth 6, "deit" order: bipartite rule at 0-2, pitome rule at 3-5
@pytest.mark.parametrize("ratio", [0.8, 0.5])
def test_pitome_step_matches_naive(prefix, layer, ratio):
    n, depth = 29, 6
    x, metric, size = step_inputs(n, seed=prefix * 7 + layer)
    method = tokenreduce.make_method("pitome", ratio=ratio)
    num_out = method.schedule(n, prefix, 1)[0]
    got_x, got_size, _ = run_select(method, x, metric, size, layer, depth, prefix, num_out)
    margin = 0.75 * (1 - layer / depth)
    for b in range(3):
        want_x, want_size = naive_pitome_tofu_dct.pitome_step(
            x[b], metric[b], size[b, :, 0], ratio, margin, prefix, bipartite=layer < 3
        )
        torch.testing.assert_close(got_x[b], want_x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_size[b, :, 0], want_size)


@pytest.mark.parametrize("model_name", ["vit", "dinov2_reg", "no_cls_avg", "qknorm_avg"])
@pytest.mark.parametrize("variant_order", ["deit", "mae"])
def test_pitome_model_matches_naive(model_name, variant_order):
    model, x = build(model_name, depth=5), images(batch=3)
    prefix, depth, ratio = model.num_prefix_tokens, 5, 0.8

    def step(layer, t, k, probs, size):
        early = layer < math.ceil(depth / 2)
        bipartite = early if variant_order == "deit" else not early
        return naive_pitome_tofu_dct.pitome_step(t, k.mean(0), size, ratio, 0.75 * (1 - layer / depth), prefix, bipartite)

    want = reference.vit_forward(model, x, step, prop_attn=False)
    tokenreduce.apply(model, "pitome", ratio=ratio, variant_order=variant_order)
    torch.testing.assert_close(output(model, x), want, rtol=1e-4, atol=1e-4)


def test_pitome_prop_attn_option_matches_naive():
    model, x = build("vit"), images(batch=3)

    def step(layer, t, k, probs, size):
        return naive_pitome_tofu_dct.pitome_step(t, k.mean(0), size, 0.85, 0.6 * (1 - layer / 4), 1, layer < 2)

    want = reference.vit_forward(model, x, step, prop_attn=True)
    tokenreduce.apply(model, "pitome", ratio=0.85, margin=0.6, prop_attn=True)
    torch.testing.assert_close(output(model, x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_name", ["hf_clip", "hf_siglip"])
@pytest.mark.parametrize("method", ["pitome", "tofu"])
def test_on_hf_towers_matches_naive(method, model_name):
    model, x = build(model_name), images(batch=2)
    prefix = 1 if model_name == "hf_clip" else 0

    def step(layer, t, k, probs, size):
        if method == "tofu":
            return naive_pitome_tofu_dct.tofu_step(t, k.mean(0), size, 6, prefix, "prune" if layer < 2 else "mlerp")
        return naive_pitome_tofu_dct.pitome_step(t, k.mean(0), size, 0.8, 0.75 * (1 - layer / 4), prefix, layer < 2)

    want = reference.hf_tower_forward(model, x, step, prop_attn=method == "tofu")
    tokenreduce.apply(model, method, **(dict(r=6) if method == "tofu" else dict(ratio=0.8)))
    torch.testing.assert_close(output(model, x), want, rtol=1e-4, atol=1e-4)


def test_pitome_deit_small_counts_and_costs():
    # r = floor(T - T * ratio) on the 196 patch tokens of every block; the spec's GMACs per ratio.
    method = tokenreduce.make_method("pitome")
    plan = method.schedule(197, 1, 12)
    assert plan == [183, 170, 158, 147, 137, 127, 118, 110, 102, 95, 88, 82]
    assert [n - m for n, m in zip([197, *plan], plan)] == [math.floor(t - t * 0.925) for t in [196, *[p - 1 for p in plan[:-1]]]]
    costs = {
        ratio: gmacs(tokenreduce.make_method("pitome", ratio=ratio).schedule(197, 1, 12), 197)
        for ratio in (0.9, 0.925, 0.95, 0.975)
    }
    assert [round(c, 2) for c in costs.values()] == [2.59, 2.99, 3.44, 4.01]  # spec: 2.60 / 2.99 / 3.44 / 4.01
    assert tokenreduce.make_method("pitome", ratio=0.5).schedule(197, 1, 2) == [99, 50]  # r = T // 2: the limit


def test_pitome_rules_and_placement():
    method = tokenreduce.make_method("pitome")
    assert [method.uses_bipartite_rule(i, 12) for i in range(12)] == [True] * 6 + [False] * 6
    assert [method.uses_bipartite_rule(i, 5) for i in range(5)] == [True] * 3 + [False] * 2
    mae = tokenreduce.make_method("pitome", variant_order="mae")
    assert [mae.uses_bipartite_rule(i, 12) for i in range(12)] == [False] * 6 + [True] * 6


def test_pitome_rule_a_merges_every_a_token_and_protects_low_energy():
    # Tokens 1-4 point one way (a high-energy cluster), 5 and 6 are isolated: with r = 2 the four
    # clustered tokens are the mergeable ones (each A joins its best B) and the isolated ones are protected.
    metric = torch.tensor([[1.0, 0, 0], [1, 0.1, 0], [1, 0, 0.1], [1, 0.1, 0.1], [1, -0.1, 0], [0, 1, 0], [0, 0, 1]])[None]
    x = torch.arange(7.0)[None, :, None]
    method = tokenreduce.make_method("pitome", ratio=0.6)
    num_out = method.schedule(7, 1, 1)[0]
    assert num_out == 5
    got, sizes, selection = run_select(method, x, metric, torch.ones(1, 7, 1), 5, 6, 1, num_out)
    assert selection.index[0, 0] == 0 and sorted(selection.index[0, 1:3].tolist()) == [5, 6]  # protected after CLS
    assert sizes[0, :3, 0].tolist() == [1, 1, 1] and sizes[0, 3:, 0].sum() == 4
    slot = selection.slot[0].tolist()
    assert sorted(slot[1:5]) in ([3, 3, 4, 4], [3, 3, 3, 4], [3, 4, 4, 4])
    for j in (3, 4):
        group = [i for i in range(7) if slot[i] == j]
        assert got[0, j, 0].item() == pytest.approx(sum(group) / len(group))


def test_pitome_half_precision_on_a_well_conditioned_model():
    # The contract holds pitome to a looser float16 bound (energy near-ties reorder); on the plain ViT
    # at ratio 0.9 the fp16 output still keeps the fp32 direction.
    model, x = build("vit"), images()
    tokenreduce.apply(model, "pitome", ratio=0.9)
    want = output(model, x)
    tokenreduce.apply(model.half(), "pitome", ratio=0.9)
    got = output(model, x.half()).float()
    assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() > 0.99


# -- ToFu -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [0, 1, 2, 5])
@pytest.mark.parametrize("mode", ["prune", "mlerp", "mean", "reference"])
def test_tofu_step_matches_naive(prefix, mode):
    n, r = 24, 7
    x, metric, size = step_inputs(n, seed=prefix * 11 + len(mode))
    prune_layers = 1 if mode == "prune" else 0
    method = tokenreduce.make_method("tofu", r=r, merge="mlerp" if mode == "prune" else mode, prune_layers=prune_layers)
    got_x, got_size, _ = run_select(method, x, metric, size, 0, 4, prefix, n - r)
    for b in range(3):
        want_x, want_size = naive_pitome_tofu_dct.tofu_step(x[b], metric[b], size[b, :, 0], r, prefix, mode)
        torch.testing.assert_close(got_x[b], want_x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_size[b, :, 0], want_size)


def tofu_modes(layer: int, depth: int, merge: str, prune_layers) -> str:
    pruning = {"paper": math.ceil(depth / 2), "reference": depth // 2 + 1}.get(prune_layers, prune_layers)
    return "prune" if layer < pruning else merge


@pytest.mark.parametrize("model_name", ["vit", "dinov2_reg", "no_cls_avg", "qknorm_avg"])
@pytest.mark.parametrize(
    "merge,prune_layers,prop_attn", [("mlerp", "paper", True), ("reference", "reference", False), ("mean", 1, True)]
)
def test_tofu_model_matches_naive(model_name, merge, prune_layers, prop_attn):
    model, x = build(model_name, depth=5), images(batch=3)
    prefix, r = model.num_prefix_tokens, [5, 8, 3, 6, 4]

    def step(layer, t, k, probs, size):
        return naive_pitome_tofu_dct.tofu_step(t, k.mean(0), size, r[layer], prefix, tofu_modes(layer, 5, merge, prune_layers))

    want = reference.vit_forward(model, x, step, prop_attn=prop_attn)
    tokenreduce.apply(model, "tofu", r=r, merge=merge, prune_layers=prune_layers, prop_attn=prop_attn)
    torch.testing.assert_close(output(model, x), want, rtol=1e-4, atol=1e-4)


def test_tofu_schedule_is_tome_and_pruning_loses_mass():
    for config in [dict(), dict(r=13), dict(r=(13, -0.5)), dict(keep_ratio=0.5)]:
        assert tokenreduce.make_method("tofu", **config).schedule(197, 1, 12) == tokenreduce.make_method(
            "tome", **config
        ).schedule(197, 1, 12)
    assert tokenreduce.make_method("tofu").schedule(197, 1, 12)[-1] == 41  # r = 13, the paper's ViT-S setting
    tofu = tokenreduce.make_method("tofu")
    assert [tofu.pruning_blocks(d) for d in (12, 4, 5)] == [6, 2, 3]
    assert tokenreduce.make_method("tofu", prune_layers="reference").pruning_blocks(12) == 7  # i <= L // 2
    model = tokenreduce.apply(build("vit"), "tofu", r=6, prune_layers=4)
    output(model, images())
    rec = tokenreduce.record(model)
    assert rec.size.sum(dim=(1, 2)).tolist() == [41.0, 41.0] and (rec.owner == -1).sum(dim=1).tolist() == [24, 24]


def test_mlerp_keeps_the_largest_norm_and_the_mean_direction():
    x = torch.tensor([[[3.0, 0.0], [0.0, 4.0], [1.0, 1.0]]])
    merged = keep(torch.tensor([[1, 2]]), 3)  # a pure gather: nothing merges, nothing changes
    assert torch.equal(rescale_to_max_norm(merged, x).apply(x), merged.apply(x))
    pair = bipartite_merge(torch.ones(1, 1, 1), torch.tensor([[0]]), torch.tensor([[1]]), 1, 3, torch.tensor([[2]]))
    assert pair.apply(x).tolist() == [[[1.0, 1.0], [1.5, 2.0]]]
    torch.testing.assert_close(rescale_to_max_norm(pair, x).apply(x), torch.tensor([[[1.0, 1.0], [2.4, 3.2]]]))  # norm 4
    # the third-party form divides by the destination's norm (4) instead of the mean's (2.5)
    torch.testing.assert_close(rescale_to_max_norm(pair, x, "destination").apply(x), torch.tensor([[[1.0, 1.0], [1.5, 2.0]]]))


def test_bipartite_merge_takes_given_sets_and_can_prune():
    # A = {3, 1}, B = {0, 2}, token 4 kept in front; 3 -> 2 is the stronger edge.
    scores = torch.tensor([[[0.1, 0.9], [0.5, 0.2]]])
    a, b, kept = torch.tensor([[3, 1]]), torch.tensor([[0, 2]]), torch.tensor([[4]])
    x = torch.arange(5.0)[None, :, None]
    merge = bipartite_merge(scores, a, b, 1, 5, kept)
    assert merge.index.tolist() == [[4, 1, 0, 2]] and merge.apply(x)[0, :, 0].tolist() == [4.0, 1.0, 0.0, 2.5]
    prune = bipartite_merge(scores, a, b, 1, 5, kept, drop_sources=True)
    assert prune.gather_only and prune.apply(x)[0, :, 0].tolist() == [4.0, 1.0, 0.0, 2.0]
    assert bipartite_merge(scores, a, b, 2, 5, kept).apply(x)[0, :, 0].tolist() == [4.0, 0.5, 2.5]


# -- DCT ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["vit", "dinov2_reg", "no_cls_avg", "qknorm_avg"])
def test_dct_model_matches_naive(model_name):
    model, x = build(model_name), images(batch=2)
    prefix, ratio = model.num_prefix_tokens, 0.8
    sizes = []

    def step(layer, t, k, probs, size):
        t, size = naive_pitome_tofu_dct.dct_step(t, size, ratio, prefix)
        sizes.append(size)
        return t, size

    want = reference.vit_forward(model, x, step, prop_attn=False, at_end=True)
    tokenreduce.apply(model, "dct", ratio=ratio)
    torch.testing.assert_close(output(model, x), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tokenreduce.record(model).size[..., 0], torch.stack([sizes[3], sizes[7]]))


def test_dct_restore_is_the_transpose():
    model, x = build("dinov2_reg", depth=1), images(batch=2)
    tokenreduce.apply(model, "dct", ratio=0.7)
    with torch.no_grad():
        tokens = model.forward_features(x)
    rec = tokenreduce.record(model)
    assert rec.tokens_per_layer == (5 + 45,)
    want = torch.stack([naive_pitome_tofu_dct.dct_restore(t, 69, 5) for t in tokens]).float()
    torch.testing.assert_close(rec.restore(tokens), want, rtol=1e-5, atol=1e-5)


def test_dct_lowpass_matrix():
    d = dct_matrix(9).double()
    torch.testing.assert_close(d @ d.T, torch.eye(9, dtype=torch.float64), rtol=0, atol=1e-6)
    for i, k in [(0, 0), (3, 1), (8, 8)]:
        assert d[k, i].item() == pytest.approx(naive_pitome_tofu_dct._dct_basis(9, k, i), abs=1e-7)
    low = dct_lowpass(196, 180)
    torch.testing.assert_close(low @ low.T, torch.eye(180), rtol=0, atol=1e-5)  # rows orthonormal
    torch.testing.assert_close(low @ torch.ones(196), torch.full((180,), math.sqrt(196 / 180)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dct_lowpass(7, 7), torch.eye(7), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"m must be in \[1, 7\]"):
        dct_lowpass(7, 8)


def test_dct_deit_small_counts_and_cost():
    plan = tokenreduce.make_method("dct").schedule(197, 1, 12)
    assert plan == [181, 166, 152, 140, 129, 119, 109, 100, 92, 85, 78, 72]
    assert plan[0] == 1 + math.ceil(196 * 0.915) == 181
    assert round(gmacs(plan, 197, at_end=True), 2) == 2.96
    assert tokenreduce.make_method("dct", ratio=0.925).schedule(197, 1, 1) == [1 + math.ceil(196 * 0.925)]


@pytest.mark.parametrize("model_name", ["vit", "hf_clip"])
def test_dct_analytic_macs_count_blocks_at_their_input_size(model_name):
    # DCT reduces after the MLP: both branches of a block run on its input count (model_macs(hook="end")),
    # and the dense mix is one [num_out, N] @ [N, C] product per block, which torch's counter also sees, as it
    # sees the matrix being built (a [T', T'] @ [T', T] product per block, whatever the batch).
    model = build(model_name)
    use_eager_attention(model)
    tokenreduce.apply(model, "dct", ratio=0.8)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images(batch=1))
    rec = tokenreduce.record(model)
    macs = model_macs(locate(model)[2], model, rec.input_tokens, rec.tokens_per_layer, Hook.END)
    n_in = [rec.input_tokens, *rec.tokens_per_layer[:-1]]
    p = rec.num_prefix
    mixing = sum(n * m * 48 + (m - p) ** 2 * (n - p) for n, m in zip(n_in, rec.tokens_per_layer))
    assert counter.get_total_flops() / 2 == pytest.approx(macs + mixing, rel=0.015)
    assert model_macs(locate(model)[2], model, rec.input_tokens, rec.tokens_per_layer) < macs  # the MLP-after-reduction count


# -- config errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,config,error,match",
    [
        ("pitome", dict(ratio=0.4), ValueError, r"ratio must be a number in \[0.5, 1\], got 0.4"),
        ("pitome", dict(ratio=1.2), ValueError, r"ratio must be a number in \[0.5, 1\]"),
        ("pitome", dict(margin=1.5), ValueError, r"margin must be a number in \[0, 1\]"),
        ("pitome", dict(variant_order="bsm"), ValueError, r"variant_order must be one of \('deit', 'mae'\)"),
        ("pitome", dict(prop_attn=1), TypeError, r"prop_attn must be True or False"),
        ("tofu", dict(merge="max"), ValueError, r"merge must be one of \('mlerp', 'mean', 'reference'\)"),
        ("tofu", dict(prune_layers="half"), ValueError, r"prune_layers must be one of \('paper', 'reference'\) or an integer"),
        ("tofu", dict(prune_layers=-1), ValueError, r"prune_layers must be an integer >= 0"),
        ("tofu", dict(r=-2), ValueError, r"r must be an integer >= 0"),
        ("dct", dict(ratio=0), ValueError, r"ratio must be a number in \(0, 1\], got 0"),
        ("dct", dict(ratio=1.5), ValueError, r"ratio must be a number in \(0, 1\]"),
    ],
)
def test_bad_configs_raise_with_ranges(method, config, error, match):
    with pytest.raises(error, match=match):
        tokenreduce.make_method(method, **config)


def test_tofu_prune_layers_beyond_depth_raises_at_apply():
    with pytest.raises(ValueError, match=r"prune_layers must be an integer in \[0, 4\] for this model, got 5"):
        tokenreduce.apply(build("vit"), "tofu", r=2, prune_layers=5)
