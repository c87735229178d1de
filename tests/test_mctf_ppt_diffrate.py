"""MCTF, PPT and DiffRate: reference token counts and GMACs, naive oracles (``naive_mctf_ppt_diffrate``), identities,
config errors."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

import naive_mctf_ppt_diffrate as naive
import reference
import tokenreduce
from conftest import build, images, output
from tokenreduce.core import alternate_merge, merge_attention
from tokenreduce.methods.diffrate import RELEASED
from tokenreduce.methods.mctf import multi_criteria_scores

C_DEIT_S = 384


def gmacs(attention_tokens, mlp_tokens, width=C_DEIT_S, patches=196, classes=1000) -> float:
    """The spec's analytic DeiT-S model: per block ``4 Na C^2 + 2 Na^2 C + 8 Nm C^2``, plus stem and head."""
    blocks = sum(4 * a * width**2 + 2 * a * a * width + 8 * m * width**2 for a, m in zip(attention_tokens, mlp_tokens))
    return (blocks + patches * 768 * width + width * classes) / 1e9


def plan(method, **config):
    return tokenreduce.make_method(method, **config).schedule


# -- reference token counts and GMACs ------------------------------------------------------------------


def test_mctf_deit_s_counts_and_gmacs():
    counts = plan("mctf")(197, 1, 12)
    assert counts == [197] + [197 - 16 * i for i in range(1, 12)]  # 197 -> 181 -> ... -> 21
    assert counts[-1] == 21
    # merging at the block start: attention and MLP both run on the merged tokens
    assert gmacs(counts, counts) == pytest.approx(2.51, abs=0.005)
    fast = plan("mctf", r=0.35, layers=(3, 6, 9))(197, 1, 12)  # MCTF-Fast's schedule
    assert fast == [197] * 3 + [129] * 3 + [85] * 3 + [56] * 3


@pytest.mark.parametrize(
    "tokens,prefix,depth,r",
    [(197, 1, 24, 16), (198, 2, 12, 16), (1370, 1, 12, 16), (65, 1, 12, 9), (197, 1, 12, 0.3), (30, 0, 6, 8)],
)
def test_mctf_counts_follow_the_reference_rule(tokens, prefix, depth, r):
    n, want = tokens, []
    for layer in range(depth):
        n -= naive.mctf_count(n, r, prefix) if layer else 0
        want.append(n)
    assert plan("mctf", r=r)(tokens, prefix, depth) == want
    assert min(want) >= min(10, tokens)  # never below 10 tokens (ViT-L: r = 16 in 23 blocks stops at 10)


def test_ppt_deit_s_counts_and_gmacs():
    counts = plan("ppt")(197, 1, 12)
    assert counts == [197] * 3 + [147] * 3 + [97] * 3 + [49] * 3
    entering = [197, *counts[:-1]]
    # 2.941 analytic; the README counts 2.944411999 with torchprofile (small ops included)
    assert gmacs(entering, counts) == pytest.approx(2.944, abs=0.005)


def test_diffrate_deit_s_counts_and_gmacs():
    prune, merge = RELEASED["deit-s-2.9"]
    assert prune == (197, 196, 190, 168, 150, 139, 129, 117, 99, 78, 58, 3)
    assert merge == (197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3)
    counts = plan("diffrate")(197, 1, 12)
    assert counts == list(merge)
    assert gmacs([197, *counts[:-1]], counts) == pytest.approx(2.905, abs=0.0005)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_diffrate_released_schedules_on_their_own_models(name):
    prune, merge = RELEASED[name]
    n, want = prune[0], []
    for layer, (p, m) in enumerate(zip(prune, merge)):
        n = n if layer == 0 else min(n, p, m)
        want.append(n)
    assert plan("diffrate", schedule_name=name)(prune[0], 1, len(prune)) == want


def stretched(released, tokens, prefix, depth):
    """The documented rule, written with fractions: ``P + ceil(f((i + 1) / depth) * M)``."""
    points = [(Fraction(0), Fraction(1))] + [
        (Fraction(i + 1, len(released)), Fraction(k - 1, released[0] - 1)) for i, k in enumerate(released)
    ]
    out = []
    for i in range(depth):
        t = Fraction(i + 1, depth)
        (t0, f0), (t1, f1) = next((a, b) for a, b in zip(points, points[1:]) if a[0] <= t <= b[0])
        f = f0 + (f1 - f0) * (t - t0) / (t1 - t0)
        out.append(prefix + max(1, math.ceil(f * (tokens - prefix))))
    return out


@pytest.mark.parametrize(
    "tokens,prefix,depth,name",
    [
        (197, 1, 12, "deit-s-2.9"),  # DeiT-S: the released list
        (198, 2, 12, "deit-s-2.9"),  # distilled DeiT: the prefix is added on top
        (1370, 1, 12, "deit-s-2.9"),  # DINOv2 ViT-S/14 at 518 px
        (1374, 5, 12, "deit-s-2.9"),  # DINOv2 with 4 registers
        (197, 1, 24, "mae-l-42.3"),  # ViT-L: its own list
        (257, 1, 32, "mae-h-103.4"),  # ViT-H/14: its own list
        (65, 1, 4, "deit-s-2.9"),  # a 4-block model: stretched
        (197, 1, 6, "deit-s-2.9"),
    ],
)
def test_diffrate_default_picks_by_depth_and_scales(tokens, prefix, depth, name):
    counts = tokenreduce.make_method("diffrate").kept_counts(tokens, prefix, depth)
    assert counts == tuple(stretched(r, tokens, prefix, depth) for r in RELEASED[name])
    if tokens - prefix == RELEASED[name][0][0] - 1 and depth == len(RELEASED[name][0]):
        assert counts == tuple([k - 1 + prefix for k in r] for r in RELEASED[name])


def test_diffrate_named_schedule_stretched_over_another_depth():
    counts = tokenreduce.make_method("diffrate", schedule_name="deit-s-2.9").kept_counts(197, 1, 24)
    assert counts == tuple(stretched(r, 197, 1, 24) for r in RELEASED["deit-s-2.9"])
    assert counts[1][1::2] == list(RELEASED["deit-s-2.9"][1])  # every second block lands on the released point


# -- naive oracles: selections ---------------------------------------------------------------------------


def groups_of(selection, row: int) -> list[list[int]]:
    slot = selection.slot[row].tolist()
    return [sorted(i for i, s in enumerate(slot) if s == j) for j in range(selection.num_out)]


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("prefix", [0, 1, 2, 5])
@pytest.mark.parametrize("n", [23, 30])
def test_mctf_merge_matches_naive(n, prefix, bidirectional):
    gen = torch.Generator().manual_seed(n * 10 + prefix)
    x = torch.randn(2, n, 8, generator=gen)
    probs = (torch.randn(2, 3, n, n, generator=gen) * 2).softmax(dim=-1)
    size = torch.randint(1, 5, (2, n), generator=gen).float()
    received = probs.mean(dim=(1, 2))
    for r in [1, (n - prefix) // 3, (n - prefix) // 2]:
        scores = multi_criteria_scores(x, received, size, 1.0, 20.0, 40.0)
        weight = received * size
        selection = alternate_merge(scores, r, prefix, weight, bidirectional=bidirectional)
        got_x, got_size, got_attn = selection.apply(x), selection.sizes(size[..., None]), merge_attention(probs, selection)
        for b in range(2):
            groups = naive.mctf_groups(x[b], probs[b], size[b], r, prefix, bidirectional=bidirectional)
            assert [sorted(g) for g in groups] == groups_of(selection, b)
            want_x, want_size = naive.pool_groups(x[b], size[b], groups, weight[b].tolist())
            torch.testing.assert_close(got_x[b], want_x, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_size[b, :, 0], want_size)
            torch.testing.assert_close(
                got_attn[b], naive.merged_attention(probs[b], groups, weight[b].tolist()), rtol=1e-5, atol=1e-6
            )


# -- naive oracles: whole models ---------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["vit", "dinov2_reg", "deit_distilled", "qknorm_avg", "no_cls_avg"])
@pytest.mark.parametrize("one_step_ahead", [1, 2, 0])
def test_mctf_model_matches_naive(model_name, one_step_ahead):
    model, x = build(model_name), images(batch=3)
    want = naive.mctf_forward(model, x, 6, layers={1, 2, 3}, one_step_ahead=one_step_ahead)
    tokenreduce.apply(model, "mctf", r=6, one_step_ahead=one_step_ahead)
    torch.testing.assert_close(output(model, x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "config",
    [
        dict(r=0.25, layers=(0, 2)),
        dict(r=5, bidirectional=False, pooling="size"),
        dict(r=7, pooling="mean", tau_sim=2.0, tau_info=0.0, tau_size=10.0),
    ],
)
def test_mctf_options_match_naive(config):
    model, x = build("vit", depth=5), images(batch=2)
    layers = set(config.get("layers", range(1, 5)))
    kw = dict(tau=(config.get("tau_sim", 1.0), config.get("tau_info", 20.0), config.get("tau_size", 40.0)))
    kw["bidirectional"] = config.get("bidirectional", True)
    want = naive.mctf_forward(model, x, config["r"], layers=layers, pooling=config.get("pooling", "attention"), **kw)
    tokenreduce.apply(model, "mctf", **config)
    torch.testing.assert_close(output(model, x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_name", ["vit", "dinov2_reg", "deit_distilled"])
@pytest.mark.parametrize("threshold", [0.0, 1.0, None])
def test_ppt_model_matches_naive(model_name, threshold):
    model, x = build(model_name, depth=6), images(batch=4)
    prefix, layers, r = model.num_prefix_tokens, (1, 3, 4), 12  # default layers scaled to 6 blocks
    branches = []
    if threshold is None:  # a threshold between the images' variances: both rules run in one batch
        variances = []
        naive.vit_forward(
            model, x, lambda layer, t, q, k, v, probs, size: _ppt_variance(layer, t, v, probs, size, prefix, variances)
        )
        low, high = sorted(variances)[1:3]
        threshold = (low + high) / 2

    def step(layer, t, q, k, v, probs, size):
        if layer not in layers:
            return t, size
        t, size, pooled = naive.ppt_step(t, k, v, probs, size, r, threshold, prefix)
        branches.append(pooled)
        return t, size

    want = naive.vit_forward(model, x, step)
    tokenreduce.apply(model, "ppt", r=r, threshold=threshold)
    torch.testing.assert_close(output(model, x), want, rtol=1e-4, atol=1e-4)
    assert set(branches) == ({True} if threshold == 1.0 else {False} if threshold == 0.0 else {True, False})


def _ppt_variance(layer, t, v, probs, size, prefix, out):
    if layer == 1:  # the first reduction block: the variance decides there
        raw = [float(probs[:, 0, j].sum()) * float(v[:, j].reshape(-1).norm()) for j in range(prefix, t.shape[0])]
        sig = [s / sum(raw) for s in raw]
        out.append(float(torch.tensor(sig).var()))
    return t, size


DIFFRATE_CUSTOM = dict(prune=[100, 60, 44, 30, 26], merge=[100, 50, 46, 22, 20])  # the last block merges too


@pytest.mark.parametrize("model_name", ["vit", "dinov2_reg", "deit_distilled", "qknorm_avg"])
@pytest.mark.parametrize("config", [{}, dict(size_weighted=True), DIFFRATE_CUSTOM])
def test_diffrate_model_matches_naive(model_name, config):
    model, x = build(model_name, depth=5), images(batch=3)
    prefix = model.num_prefix_tokens
    n0 = 64 + prefix
    prune, merge = tokenreduce.make_method("diffrate", **config).kept_counts(n0, prefix, 5)
    sizes = []

    def step(layer, t, q, k, v, probs, size):
        n = t.shape[0]
        pruned = n if layer == 0 else min(n, prune[layer])
        merged = pruned if layer == 0 else min(pruned, merge[layer])
        t, size = naive.diffrate_step(t, probs, size, pruned, merged, prefix, config.get("size_weighted", False))
        if layer == 4:
            sizes.append(size)
        return t, size

    want = naive.vit_forward(model, x, step)
    tokenreduce.apply(model, "diffrate", **config)
    torch.testing.assert_close(output(model, x), want, rtol=1e-4, atol=1e-4)
    rec = tokenreduce.record(model)
    torch.testing.assert_close(rec.size[..., 0], torch.stack(sizes), rtol=1e-5, atol=1e-5)
    if config is DIFFRATE_CUSTOM:
        assert not torch.equal(rec.size[..., 0], rec.source.sum(dim=-1)), "sizes should be similarity-discounted"


@pytest.mark.parametrize("model_name", ["hf_clip", "hf_dinov2", "hf_vit"])
def test_diffrate_on_hf_towers_matches_naive(model_name):
    model, x = build(model_name), images(batch=2)
    prefix = 1
    prune, merge = tokenreduce.make_method("diffrate").kept_counts(65, prefix, 4)

    def step(layer, t, k, probs, size):
        n = t.shape[0]
        pruned = n if layer == 0 else min(n, prune[layer])
        merged = pruned if layer == 0 else min(pruned, merge[layer])
        return naive.diffrate_step(t, probs, size, pruned, merged, prefix)

    want = reference.hf_tower_forward(model, x, step)
    tokenreduce.apply(model, "diffrate")
    torch.testing.assert_close(output(model, x), want, rtol=1e-4, atol=1e-4)


# -- identities and variants ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,config",
    [
        ("mctf", dict(r=0)),
        ("mctf", dict(r=0.0, one_step_ahead=2)),
        ("ppt", dict(r=0)),
        ("diffrate", dict(prune=[65] * 4, merge=[65] * 4)),
    ],
)
def test_identity_configs_are_bit_identical(method, config):
    model, x = build("vit"), images()
    want = output(model, x)
    with tokenreduce.applied(model, method, **config):
        assert torch.equal(output(model, x), want)


def test_mctf_variant_flags_follow_one_step_ahead():
    ahead, precise, after = (tokenreduce.make_method("mctf", one_step_ahead=i) for i in (1, 2, 0))
    assert (ahead.hook, ahead.start_qkv, ahead.edits_attention) == ("start", True, True)
    assert (precise.hook, precise.start_qkv, precise.edits_attention) == ("start", True, False)
    assert (after.hook, after.start_qkv, after.edits_attention) == ("end", False, False)
    assert not tokenreduce.make_method("mctf", r=0).edits_attention
    model, x = build("vit"), images()
    outs = []
    for i in (1, 2, 0):
        tokenreduce.apply(model, "mctf", r=6, one_step_ahead=i)
        outs.append(output(model, x))
    assert not torch.allclose(outs[0], outs[1], atol=1e-4) and not torch.allclose(outs[1], outs[2], atol=1e-4)


@pytest.mark.parametrize("method", ["ppt", "diffrate"])
def test_needs_a_class_token(method):
    with pytest.raises(ValueError, match="class token"):
        tokenreduce.apply(build("no_cls_avg"), method)


@pytest.mark.parametrize(
    "method,config,error,match",
    [
        ("mctf", dict(r=-1), ValueError, r"r .*integer >= 0"),
        ("mctf", dict(r=1.5), ValueError, r"r .*in \[0, 1\)"),
        ("mctf", dict(r=True), TypeError, r"r .*integer"),
        ("mctf", dict(one_step_ahead=3), ValueError, r"one_step_ahead must be an integer in \[0, 2\]"),
        ("mctf", dict(pooling="max"), ValueError, r"pooling must be one of"),
        ("mctf", dict(tau_info=-1), ValueError, r"tau_info must be a number >= 0"),
        ("mctf", dict(layers=()), ValueError, r"layers must be a non-empty"),
        ("ppt", dict(r=-2), ValueError, r"r must be an integer >= 0"),
        ("ppt", dict(threshold=-1e-5), ValueError, r"threshold must be a number >= 0"),
        ("ppt", dict(r=2.5), TypeError, r"r must be an integer"),
        ("diffrate", dict(schedule_name="deit-s-9.9"), ValueError, r"schedule_name must be one of"),
        ("diffrate", dict(prune=[197] * 12), ValueError, r"needs both prune and merge"),
        ("diffrate", dict(schedule_name="deit-s-2.9", prune=[1], merge=[1]), ValueError, r"not both"),
        ("diffrate", dict(prune=[197, 0], merge=[197, 100]), ValueError, r"prune\[1\] must be an integer >= 1"),
        ("diffrate", dict(prune=[197] * 3, merge=[197] * 2), ValueError, r"one entry per block each"),
        ("diffrate", dict(size_weighted=1), TypeError, r"size_weighted must be True or False"),
    ],
)
def test_bad_configs_raise_with_ranges(method, config, error, match):
    with pytest.raises(error, match=match):
        tokenreduce.make_method(method, **config)


@pytest.mark.parametrize(
    "config,match",
    [
        (dict(prune=[65] * 3, merge=[65] * 3), r"one kept-token count per block \(4 for this model\)"),
        (dict(prune=[65, 50, 40, 1], merge=[65] * 4), r"prune counts must be >= 2"),
        (dict(prune=[60, 50, 40, 30], merge=[65] * 4), r"prune\[0\] must be >= 65"),
        (dict(prune=[197, 196, 190, 168], merge=[197, 194, 176, 156]), None),  # fits: counts above the tokens keep them all
    ],
)
def test_diffrate_custom_schedule_must_fit_the_model(config, match):
    model = build("vit")
    if match is None:
        tokenreduce.apply(model, "diffrate", **config)
        return
    with pytest.raises(ValueError, match=match):
        tokenreduce.apply(model, "diffrate", **config)


def test_layers_outside_the_model_raise():
    for method in ("mctf", "ppt"):
        with pytest.raises(ValueError, match=r"layers must be block indices in \[0, 3\]"):
            tokenreduce.apply(build("vit"), method, layers=(2, 4))


def test_size_coefficients_follow_composition_and_per_image_choice():
    from tokenreduce.core import Selection, choose_rows, keep

    size = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]] * 2)[..., None]
    discounted = Selection(
        torch.tensor([[0, 1, 1, 2, 2]] * 2),
        torch.tensor([[0, 1, 3]] * 2),
        torch.full((2, 5), 0.5),
        size_coeff=torch.tensor([[1.0, 1.0, 0.5, 1.0, 0.25]] * 2),
    )
    assert discounted.sizes(size)[0, :, 0].tolist() == [1.0, 3.5, 5.25]
    later = keep(torch.tensor([[0, 2]] * 2), 3)
    both = discounted.then(later)
    torch.testing.assert_close(both.sizes(size), later.sizes(discounted.sizes(size)))
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(both.apply(x), later.apply(discounted.apply(x)))
    plain = Selection(torch.tensor([[0, 0, 1, 2, 2]] * 2), torch.tensor([[0, 2, 3]] * 2), torch.full((2, 5), 0.5))
    mixed = choose_rows(torch.tensor([True, False]), discounted, plain)
    torch.testing.assert_close(mixed.sizes(size)[0], discounted.sizes(size)[0])
    torch.testing.assert_close(mixed.sizes(size)[1], plain.sizes(size)[1])
