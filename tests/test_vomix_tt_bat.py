"""Vote&Mix (``vomix``), Token Transforming (``token_transforming``) and BAT (``bat``): their core steps and
whole models against the naive implementations in ``naive_vomix_tt_bat``, their DeiT-S schedules, and their configs."""

from __future__ import annotations

import math

import pytest
import torch

import naive_vomix_tt_bat
import reference
import tokenreduce
from conftest import build, images, output
from tokenreduce.core import density_peaks, keep_and_cluster, stable_order, transform_to_targets, vote_and_mix


def _random(b, n, c, d, seed):
    gen = torch.Generator().manual_seed(seed)
    x, metric = torch.randn(b, n, c, generator=gen), torch.randn(b, n, d, generator=gen)
    return x, metric, torch.randint(1, 4, (b, n, 1), generator=gen).float()


# -- core steps ---------------------------------------------------------------------------------------


def test_stable_order_is_a_stable_descending_sort():
    scores = torch.tensor([[0.5, 2.0, 0.5, -1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    want = torch.sort(scores, dim=1, descending=True, stable=True).indices
    assert torch.equal(stable_order(scores), want)


def test_density_peaks_batch_equals_rows():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, 6, generator=gen)
    assignment, centres = density_peaks(x, 4, 5)
    for b in range(3):
        a, c = density_peaks(x[b], 4, 5)
        assert torch.equal(assignment[b], a) and torch.equal(centres[b], c)
        want_a, want_c = naive_vomix_tt_bat.density_peaks(x[b], 4, 5)
        assert assignment[b].tolist() == want_a and centres[b].tolist() == want_c


def test_keep_and_cluster_weights_the_cluster_means():
    x = torch.arange(12.0).view(1, 6, 2)
    kept, clustered = torch.tensor([[0, 3]]), torch.tensor([[1, 2, 4, 5]])
    assignment, centres = torch.tensor([[0, 0, 1, 1]]), torch.tensor([[1, 2]])
    sel = keep_and_cluster(kept, clustered, assignment, centres, 6, torch.tensor([[1.0, 3.0, 1.0, 1.0]]))
    want = torch.stack([x[0, 0], x[0, 3], (x[0, 1] + 3 * x[0, 2]) / 4, (x[0, 4] + x[0, 5]) / 2])
    torch.testing.assert_close(sel.apply(x)[0], want)
    assert sel.index.tolist() == [[0, 3, 2, 4]]  # the centres, cluster_index[1] and cluster_index[2]


@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("temperature", [1.0, 0.2])
def test_vote_and_mix_matches_naive(prefix, temperature):
    n = 23
    x, metric, size = _random(3, n, 8, 6, seed=prefix)
    for remove in [1, 5, n - prefix - 1]:  # the last removes tokens with no votes: ties in position order
        sel = vote_and_mix(metric, remove, prefix, temperature)
        got_x, got_size = sel.apply(x), sel.sizes(size)
        for b in range(3):
            want_x, want_size = naive_vomix_tt_bat.vomix_step(x[b], metric[b], size[b, :, 0], remove, prefix, temperature)
            torch.testing.assert_close(got_x[b], want_x.float(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_size[b, :, 0], want_size.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("spread,temperature", [(1, 0.1), (3, 0.1), (4, 1.0)])
def test_transform_to_targets_matches_naive(prefix, spread, temperature):
    n = 21
    x, metric, size = _random(3, n, 8, 6, seed=10 + prefix)
    importance = torch.rand(3, n - prefix, generator=torch.Generator().manual_seed(prefix))
    for targets in [spread, 9, n - prefix]:
        sel = transform_to_targets(metric, importance, targets, prefix, spread, temperature, size)
        got_x, got_size = sel.apply(x), sel.sizes(size)
        for b in range(3):
            want_x, want_size = naive_vomix_tt_bat.transform_step(
                x[b], metric[b], size[b, :, 0], importance[b].tolist(), prefix + targets, prefix, spread, temperature
            )
            torch.testing.assert_close(got_x[b], want_x.float(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_size[b, :, 0], want_size.float(), rtol=1e-5, atol=1e-5)


def test_transform_unmerge_spreads_each_token_back_by_its_weights():
    x, metric, size = _random(2, 12, 4, 5, seed=3)
    sel = transform_to_targets(metric, torch.rand(2, 11), 4, 1, 2, 0.5, size)
    y = torch.randn(2, 5, 4)
    back = sel.unmerge(y)
    assign = sel.inverse  # [B, N, 5]: rows sum to 1; targets and the prefix token onto their own output
    torch.testing.assert_close(assign.sum(dim=-1), torch.ones(2, 12))
    torch.testing.assert_close(back, assign @ y)
    torch.testing.assert_close(back.gather(1, sel.index[..., None].expand(-1, -1, 4)), y)


def test_all_targets_with_one_spread_is_the_identity():
    x, metric, size = _random(2, 10, 4, 5, seed=4)
    sel = transform_to_targets(metric, torch.rand(2, 9), 9, 1, 1, 0.1, size)
    torch.testing.assert_close(sel.apply(x), x)
    torch.testing.assert_close(sel.sizes(size), size)


# -- whole models against the naive steps ----------------------------------------------------------------


def _keys(k):
    return k.mean(0)


@pytest.mark.parametrize("model_name", ["vit", "dinov2_reg", "qknorm_avg", "no_cls_avg"])
@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_vomix_model_matches_naive(model_name, temperature):
    model, x = build(model_name), images(batch=3)
    prefix, r = model.num_prefix_tokens, 0.2

    def step(layer, t, k, probs, size):
        remove = math.floor(r * (t.shape[0] - prefix))
        return naive_vomix_tt_bat.vomix_step(t, _keys(k), size, remove, prefix, temperature)

    want = reference.vit_forward(model, x, step, prop_attn=False)
    tokenreduce.apply(model, "vomix", r=r, temperature=temperature)
    torch.testing.assert_close(output(model, x), want, rtol=1e-4, atol=1e-4)


def _importance(probs, prefix):
    """Class-token attention (head mean) of the patches, or the attention received without a class token."""
    if prefix:
        return probs[:, 0].mean(0)[prefix:].tolist()
    return probs.mean(dim=(0, 1)).tolist()


@pytest.mark.parametrize("model_name", ["vit", "dinov2_reg", "qknorm_avg", "no_cls_avg"])
@pytest.mark.parametrize("prop_attn", [True, False])
def test_token_transforming_model_matches_naive(model_name, prop_attn):
    model, x = build(model_name), images(batch=3)
    prefix, r = model.num_prefix_tokens, 9

    def step(layer, t, k, probs, size):
        out = t.shape[0] - r
        return naive_vomix_tt_bat.transform_step(t, _keys(k), size, _importance(probs, prefix), out, prefix, 3, 0.1)

    want = reference.vit_forward(model, x, step, prop_attn=prop_attn)
    tokenreduce.apply(model, "token_transforming", r=r, prop_attn=prop_attn)
    torch.testing.assert_close(output(model, x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "method,model_name",
    [("vomix", "hf_siglip"), ("vomix", "hf_clip"), ("token_transforming", "hf_siglip"), ("token_transforming", "hf_dinov2")],
)
def test_hf_towers_match_naive(method, model_name):
    model, x = build(model_name), images(batch=3)
    prefix = 0 if model_name == "hf_siglip" else 1

    def step(layer, t, k, probs, size):
        if method == "vomix":
            return naive_vomix_tt_bat.vomix_step(t, _keys(k), size, math.floor(0.25 * (t.shape[0] - prefix)), prefix)
        return naive_vomix_tt_bat.transform_step(t, _keys(k), size, _importance(probs, prefix), t.shape[0] - 7, prefix, 2, 0.5)

    want = reference.hf_tower_forward(model, x, step, prop_attn=True)
    config = dict(r=0.25, prop_attn=True) if method == "vomix" else dict(r=7, spread=2, temperature=0.5)
    tokenreduce.apply(model, method, **config)
    torch.testing.assert_close(output(model, x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_name", ["vit", "dinov2_reg", "qknorm_avg"])
@pytest.mark.parametrize("keep_rate,cluster_rate", [(0.55, 0.5), (0.8, 0.3), (0.3, 1.0), (0.6, 0.0)])
def test_bat_model_matches_naive(model_name, keep_rate, cluster_rate):
    model, x = build(model_name, depth=6), images(batch=3)
    prefix, layers = model.num_prefix_tokens, (1, 3, 4)  # the default 3, 6, 9 of 12 scaled to depth 6

    def step(layer, t, k, probs, size):
        if layer not in layers:
            return t, size
        return naive_vomix_tt_bat.bat_step(t, _keys(k), size, probs[:, 0].mean(0).tolist(), keep_rate, prefix, cluster_rate, 5)

    want = reference.vit_forward(model, x, step, prop_attn=False)
    tokenreduce.apply(model, "bat", keep_rate=keep_rate, cluster_rate=cluster_rate)
    torch.testing.assert_close(output(model, x), want, rtol=1e-4, atol=1e-4)


def test_bat_on_hf_clip_matches_naive():
    model, x = build("hf_clip"), images(batch=3)

    def step(layer, t, k, probs, size):
        if layer not in (1, 2):
            return t, size
        return naive_vomix_tt_bat.bat_step(t, _keys(k), size, probs[:, 0].mean(0).tolist(), 0.5, 1, 0.5, 3)

    want = reference.hf_tower_forward(model, x, step, prop_attn=False)
    tokenreduce.apply(model, "bat", keep_rate=0.5, layers=(1, 2), neighbours=3)
    torch.testing.assert_close(output(model, x), want, rtol=1e-4, atol=1e-4)


# -- schedules, dense outputs and configs -----------------------------------------------------------------


def test_deit_small_schedules():
    depth, n, p = 12, 197, 1
    # BAT keep 0.7 at the 4th, 7th and 10th block: EViT's count without the fused token.
    assert tokenreduce.make_method("bat").schedule(n, p, depth) == [197] * 3 + [139] * 3 + [98] * 3 + [69] * 3
    assert tokenreduce.make_method("bat", keep_rate=0.5).schedule(n, p, depth)[-1] == 26
    # Token Transforming: r=13 per block (keep_ratio 0.2), the paper's "-40% FLOPs" operating point.
    assert tokenreduce.make_method("token_transforming").schedule(n, p, depth) == [197 - 13 * (i + 1) for i in range(12)]
    assert tokenreduce.make_method("token_transforming", r=12).schedule(n, p, depth)[-1] == 53
    # Vote&Mix: floor(0.09 * non-prefix tokens) per block.
    want, tokens = [], 197
    for _ in range(depth):
        tokens -= math.floor(0.09 * (tokens - 1))
        want.append(tokens)
    assert tokenreduce.make_method("vomix").schedule(n, p, depth) == want
    assert want[0] == 180 and want[-1] == 67


def test_token_transforming_restore_uses_the_assignment():
    model, x = build("vit"), images()
    tokenreduce.apply(model, "token_transforming", r=10)
    with torch.no_grad():
        model(x)
    rec = tokenreduce.record(model)
    y = torch.randn(2, rec.tokens_per_layer[0], 48)
    (_, sel), *_ = rec.steps
    torch.testing.assert_close(rec.restore(y, block=0), sel.inverse @ y)


@pytest.mark.parametrize(
    "method,config,error,match",
    [
        ("vomix", dict(r=1.0), ValueError, r"r must be a number in \[0, 1\)"),
        ("vomix", dict(r=-0.1), ValueError, r"r must be a number in \[0, 1\)"),
        ("vomix", dict(temperature=0), ValueError, r"temperature must be a number > 0"),
        ("vomix", dict(r="a"), TypeError, r"r must be a number"),
        ("token_transforming", dict(r=3, keep_ratio=0.5), ValueError, r"pass r or keep_ratio, not both"),
        ("token_transforming", dict(keep_ratio=0), ValueError, r"keep_ratio must be a number in \(0, 1\]"),
        ("token_transforming", dict(spread=0), ValueError, r"spread must be an integer >= 1"),
        ("token_transforming", dict(temperature=-1.0), ValueError, r"temperature must be a number > 0"),
        ("bat", dict(keep_rate=0), ValueError, r"keep_rate must be a number in \(0, 1\]"),
        ("bat", dict(cluster_rate=1.5), ValueError, r"cluster_rate must be a number in \[0, 1\]"),
        ("bat", dict(neighbours=0), ValueError, r"neighbours must be an integer >= 1"),
    ],
)
def test_bad_configs_raise_with_ranges(method, config, error, match):
    with pytest.raises(error, match=match):
        tokenreduce.make_method(method, **config)


def test_schedule_errors_name_the_allowed_range():
    with pytest.raises(ValueError, match=r"r must be in \[0, 15\] for this input"):
        tokenreduce.make_method("token_transforming", r=16).schedule(65, 1, 4)
    with pytest.raises(ValueError, match=r"spread must be in \[1, 4\]"):
        tokenreduce.make_method("token_transforming", r=15, spread=5).schedule(65, 1, 4)
    with pytest.raises(ValueError, match="no class token"):
        tokenreduce.apply(build("no_cls_avg"), "bat")


def test_identity_configs_change_nothing():
    model, x = build("dinov2_reg"), images()
    want = output(model, x)
    for method, config in [("vomix", dict(r=0.0)), ("token_transforming", dict(r=0)), ("bat", dict(keep_rate=1.0))]:
        with tokenreduce.applied(model, method, **config):
            assert torch.equal(output(model, x), want)
