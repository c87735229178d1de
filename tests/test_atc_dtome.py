"""ATC (agglomerative token clustering) and DToMe (DyMU's threshold merging, its calibration and the
``tokenreduce calibrate`` command) against naive oracles, scikit-learn and the reference's counts."""

from __future__ import annotations

import json
import math

import pytest
import torch

import naive_atc_dtome as naive
import reference
import tokenreduce
from conftest import IMAGE_TOKEN, build, images, layout, output, pixels, pooled, tiny_llava, tiny_vlm
from tokenreduce.api import patch_of
from tokenreduce.core import agglomerative_clustering, merge_clusters, threshold_soft_matching
from tokenreduce.methods.dtome import calibrate

LINKAGES = ["single", "average", "complete"]


def distances(b: int, m: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """``1 - cos`` of random vectors: symmetric, zero diagonal, no two distances equal."""
    x = torch.randn(b, m, 6, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    unit = x / x.norm(dim=-1, keepdim=True)
    d = 1 - unit @ unit.transpose(-1, -2)
    d = (d + d.transpose(-1, -2)) / 2
    return d - torch.diag_embed(d.diagonal(dim1=1, dim2=2))


def partition(labels) -> list[tuple[int, ...]]:
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(int(label), []).append(i)
    return sorted(tuple(g) for g in groups.values())


# -- ATC: the clustering --------------------------------------------------------------------------------


@pytest.mark.parametrize("linkage", LINKAGES)
def test_agglomerative_clustering_matches_sklearn(linkage):
    sklearn = pytest.importorskip("sklearn.cluster")
    for m, seed in [(9, 0), (16, 1), (23, 2)]:
        d = distances(3, m, seed)
        for k in sorted({1, 2, m // 3, m // 2, m - 1, m}):
            root = agglomerative_clustering(d, k, linkage)
            for b in range(3):
                want = sklearn.AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage=linkage)
                assert partition(root[b].tolist()) == partition(want.fit(d[b].numpy()).labels_), (m, k, b)
                assert all(root[b, i] <= i and root[b, root[b, i]] == root[b, i] for i in range(m))  # named by first member


@pytest.mark.parametrize("linkage", LINKAGES)
def test_agglomerative_clustering_matches_naive_in_float32(linkage):
    d = distances(2, 14, 5, torch.float32)
    for k in (1, 4, 9):
        root = agglomerative_clustering(d, k, linkage)
        for b in range(2):
            groups = naive.agglomerate(d[b].double().tolist(), k, linkage)
            assert partition(root[b].tolist()) == sorted(tuple(g) for g in groups)


def test_agglomerative_clustering_rejects_bad_arguments():
    d = distances(1, 5, 0)
    with pytest.raises(ValueError, match=r"linkage must be one of \('single', 'average', 'complete'\), got 'ward'"):
        agglomerative_clustering(d, 2, "ward")
    with pytest.raises(ValueError, match=r"num_clusters must be in \[1, 5\] for 5 items, got 0"):
        agglomerative_clustering(d, 0)


def test_merge_clusters_keeps_prefix_and_weights_by_size():
    root = torch.tensor([[0, 0, 2, 0, 2]])  # clusters {0, 1, 3}, {2, 4} of the five non-prefix tokens
    x = torch.randn(1, 7, 3)
    size = torch.tensor([[1.0, 1.0, 2.0, 1.0, 3.0, 1.0, 5.0]])[..., None]
    sel = merge_clusters(root, 2, 2, size)
    out, sizes = sel.apply(x), sel.sizes(size)
    first = (x[0, 2] * 2 + x[0, 3] + x[0, 5]) / 4
    second = (x[0, 4] * 3 + x[0, 6] * 5) / 8
    torch.testing.assert_close(out[0], torch.stack([x[0, 0], x[0, 1], first, second]))
    assert sizes[0, :, 0].tolist() == [1.0, 1.0, 4.0, 8.0] and sel.index.tolist() == [[0, 1, 2, 4]]


# -- ATC: the method -------------------------------------------------------------------------------------


def decreasing(r: int, depth: int) -> list[int]:
    """ToMe's ``parse_r((r, -1))`` written out: from 2r down to 0."""
    return [int(2 * r - i * 2 * r / (depth - 1)) for i in range(depth)]


def test_atc_counts_follow_the_reference():
    plan = tokenreduce.make_method("atc").schedule  # keep_ratio 0.2 -> r = 13, decreasing, single linkage
    n, want = 197, []
    for r in decreasing(13, 12):
        n = 1 + naive.atc_clusters(n, 1, r)
        want.append(n)
    assert plan(197, 1, 12) == want and want[-1] == 57
    # constant r = 13 on DeiT-S: the reference counts clusters from the length with the class token, so 12 go per block
    assert tokenreduce.make_method("atc", r=13, r_sched="constant").schedule(197, 1, 12) == list(range(185, 52, -12))
    assert tokenreduce.make_method("atc", r=13, r_sched="constant", exact_r=True).schedule(197, 1, 12)[-1] == 197 - 13 * 12
    # no 50% cap: 150 of 196 in one block (tome allows 98)
    assert tokenreduce.make_method("atc", r=[150, 0]).schedule(197, 1, 2) == [48, 48]
    assert tokenreduce.make_method("atc", r=[196, 0]).schedule(197, 1, 2) == [2, 2]  # one cluster of all patches
    assert tokenreduce.make_method("atc", r=[3, 6]).schedule(69, 5, 2) == [69, 68]  # r - P with 5 prefix tokens
    with pytest.raises(ValueError, match=r"r=197 at layer 0 would leave no cluster of the 196 mergeable tokens .*0..196"):
        tokenreduce.make_method("atc", r=[197, 0]).schedule(197, 1, 2)
    with pytest.raises(ValueError, match=r"r=64 at layer 0 would leave no cluster .*allowed 0..63"):
        tokenreduce.make_method("atc", r=[64, 0]).schedule(64, 0, 2)


@pytest.mark.parametrize(
    "config,error,match",
    [
        (dict(linkage="ward"), ValueError, r"linkage must be one of \['single', 'average', 'complete'\], got 'ward'"),
        (dict(r_sched="increase"), ValueError, r"r_sched must be one of \['constant', 'decrease'\], got 'increase'"),
        (dict(r=3, keep_ratio=0.5), ValueError, r"pass r or keep_ratio, not both"),
        (dict(r=-1), ValueError, r"r must be an integer >= 0"),
        (dict(r=[2, 2]), ValueError, r"one entry per block \(4\), got 2"),
        (dict(keep_ratio=1.5), ValueError, r"keep_ratio must be a number in \(0, 1\], got 1.5"),
        (dict(exact_r="yes"), TypeError, r"exact_r must be True or False"),
        (dict(r=[70, 0, 0, 0]), ValueError, r"r=70 at layer 0 would leave no cluster of the 64 mergeable tokens"),
    ],
)
def test_atc_bad_config_raises_with_range(config, error, match):
    model = build("vit")
    with pytest.raises(error, match=match):
        tokenreduce.apply(model, "atc", **config)
    assert not tokenreduce.is_patched(model)


@pytest.mark.parametrize("model_name", ["vit", "dinov2_reg", "qknorm_avg", "no_cls_avg"])
@pytest.mark.parametrize("linkage", LINKAGES)
def test_atc_model_matches_naive(model_name, linkage):
    model, x = build(model_name), images(batch=3)
    prefix, rs = model.num_prefix_tokens, [12, 0, 9, 4]

    def step(layer, t, k, probs, size):
        clusters = naive.atc_clusters(t.shape[0], prefix, rs[layer])
        return naive.atc_step(t, k.mean(0), size, clusters, prefix, linkage)

    want = reference.vit_forward(model, x, step)
    tokenreduce.apply(model, "atc", r=rs, linkage=linkage)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_atc_default_schedule_and_no_prop_attn_match_naive():
    model, x = build("vit"), images(batch=2)
    rs = decreasing(5, 4)

    def step(layer, t, k, probs, size):
        return naive.atc_step(t, k.mean(0), size, naive.atc_clusters(t.shape[0], 1, rs[layer], exact=True), 1, "single")

    want = reference.vit_forward(model, x, step, prop_attn=False)
    tokenreduce.apply(model, "atc", r=5, exact_r=True, prop_attn=False)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)
    assert tokenreduce.record(model).tokens_per_layer == (55, 49, 46, 46)


@pytest.mark.parametrize("model_name", ["hf_clip", "hf_siglip"])
def test_atc_on_hf_towers_matches_naive(model_name):
    model, x = build(model_name), images(batch=2)
    prefix, rs = layout(model)[1], [10, 6, 0, 3]

    def step(layer, t, k, probs, size):
        return naive.atc_step(t, k.mean(0), size, naive.atc_clusters(t.shape[0], prefix, rs[layer]), prefix, "average")

    want = reference.hf_tower_forward(model, x, step)
    tokenreduce.apply(model, "atc", r=rs, linkage="average")
    torch.testing.assert_close(output(model, x), want, rtol=1e-4, atol=1e-4)


# -- DToMe: threshold matching ---------------------------------------------------------------------------


def padded_batch(lengths: list[int], width: int, prefix: int, seed: int):
    """Rows of real tokens (sizes 1..4) followed by padding (size 0) up to the longest: ``(x, metric, size)``."""
    gen = torch.Generator().manual_seed(seed)
    n = max(lengths)
    x, metric = torch.randn(len(lengths), n, width, generator=gen), torch.randn(len(lengths), n, 5, generator=gen)
    size = torch.randint(1, 5, (len(lengths), n, 1), generator=gen).float()
    for i, length in enumerate(lengths):
        size[i, length:] = 0
    size[:, :prefix] = 1
    return x, metric, size


@pytest.mark.parametrize("prefix", [0, 1, 2, 5])
@pytest.mark.parametrize("max_r", [None, 3])
def test_threshold_matching_matches_naive_row_by_row(prefix, max_r):
    lengths = [23, 30, 17, 30, 26]
    x, metric, size = padded_batch(lengths, 4, prefix, seed=prefix)
    for threshold in (-1.0, 0.0, 0.3, 0.7):
        sel = threshold_soft_matching(metric, threshold, prefix, size, max_r)
        out, sizes = sel.apply(x), sel.sizes(size)[..., 0]
        counts = []
        for i, length in enumerate(lengths):
            want_x, want_size = naive.dtome_step(x[i, :length], metric[i, :length], size[i, :length, 0], threshold, prefix, max_r)
            k = want_x.shape[0]
            counts.append(k)
            torch.testing.assert_close(out[i, :k], want_x, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(sizes[i, :k], want_size)
            assert (sizes[i, k:] == 0).all() and (out[i, k:] == 0).all()  # padding: fed by nothing
            assert (sel.slot[i, length:] == -1).all()  # incoming padding feeds nothing
        assert out.shape[1] == max(counts)


def test_threshold_matching_merges_nothing_above_one():
    metric = torch.randn(2, 11, 4)
    assert threshold_soft_matching(metric, 1.0, 1) is None


# -- DToMe: the method -----------------------------------------------------------------------------------


THRESHOLDS = [0.55, None, 0.7, 0.6]


@pytest.mark.parametrize("model_name", ["vit", "dinov2_reg", "qknorm_avg", "no_cls_avg"])
@pytest.mark.parametrize("max_r", [None, [12, 0, 4, 30]])
def test_dtome_batch_matches_naive_per_image(model_name, max_r):
    model, x = build(model_name), images(batch=4)
    prefix = model.num_prefix_tokens
    counts: dict[int, list[list[int]]] = {}

    def step(layer, t, k, probs, size):
        out = naive.dtome_step(t, k.mean(0), size, THRESHOLDS[layer], prefix, None if max_r is None else max_r[layer])
        counts.setdefault(layer, []).append(out[0].shape[0])
        return out

    want = reference.vit_forward(model, x, step)
    tokenreduce.apply(model, "dtome", thresholds=THRESHOLDS, max_r=max_r)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    rec = tokenreduce.record(model)
    assert list(rec.tokens_per_layer) == [max(counts[i]) for i in range(4)]  # padded to the longest row
    assert len(set(counts[3])) > 1 or max_r is not None, "the images should leave with different counts"
    final = [counts[3][i] for i in range(4)]
    assert (rec.size[..., 0] > 0).sum(dim=1).tolist() == final
    assert rec.size.sum(dim=(1, 2)).tolist() == [float(rec.input_tokens)] * 4


def test_dtome_batch_of_one_has_no_padding():
    model, x = build("vit"), images(batch=1)
    tokenreduce.apply(model, "dtome", thresholds=THRESHOLDS)
    with torch.no_grad():
        model(x)
    rec = tokenreduce.record(model)
    assert rec.tokens_per_layer[-1] < rec.input_tokens and (rec.size > 0).all()


@pytest.mark.parametrize("model_name", ["hf_clip", "hf_siglip", "hf_dinov2"])
def test_dtome_on_hf_towers_matches_naive_one_image_at_a_time(model_name):
    model, x = build(model_name), images(batch=3)
    prefix = layout(model)[1]

    def step(layer, t, k, probs, size):
        return naive.dtome_step(t, k.mean(0), size, THRESHOLDS[layer], prefix)

    tokenreduce.apply(model, "dtome", thresholds=THRESHOLDS)
    batched, batched_pool = output(model, x), pooled(model, x)
    for i in range(3):
        want = reference.hf_tower_forward(model, x[i : i + 1], step)[0]
        torch.testing.assert_close(output(model, x[i : i + 1])[0], want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(batched[i, : want.shape[0]], want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(batched_pool[i], pooled(model, x[i : i + 1])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", ["max", "avgmax", "avg"])
def test_dtome_padding_is_left_out_of_timm_pooling(pool):
    model, x = build("no_cls_avg", global_pool=pool), images(batch=4)
    tokenreduce.apply(model, "dtome", thresholds=THRESHOLDS)
    batched = pooled(model, x)
    assert (tokenreduce.record(model).size == 0).any(), "this batch should need padding"
    singles = torch.cat([pooled(model, x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-5)


def test_dtome_dense_head_restores_every_image():
    model, x = build("vit"), images(batch=3)
    tokenreduce.apply(model, "dtome", thresholds=0.5)
    with torch.no_grad():
        _, (grid,) = model.forward_intermediates(x, indices=[3])
        alone = [model.forward_intermediates(x[i : i + 1], indices=[3])[1][0] for i in range(3)]
    torch.testing.assert_close(grid, torch.cat(alone), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "config,error,match",
    [
        (dict(thresholds=[0.5, 0.5]), ValueError, r"thresholds as a list must have one entry per block \(4\), got 2"),
        (dict(thresholds=1.5), ValueError, r"thresholds must be a number in \[-1, 1\], got 1.5"),
        (dict(thresholds=[0.5, "x", 0.5, 0.5]), TypeError, r"thresholds\[1\] must be a number in \[-1, 1\]"),
        (dict(thresholds=0.5, max_r=-1), ValueError, r"max_r must be an integer >= 0, got -1"),
        (dict(thresholds=0.5, max_r=[1, 2]), ValueError, r"max_r as a list must have one entry per block \(4\), got 2"),
        (dict(thresholds="missing.json"), ValueError, r"thresholds file 'missing.json' cannot be read"),
    ],
)
def test_dtome_bad_config_raises(config, error, match):
    model = build("vit")
    with pytest.raises(error, match=match):
        tokenreduce.apply(model, "dtome", **config)
    assert not tokenreduce.is_patched(model)


def test_dtome_without_thresholds_says_how_to_get_them():
    model = tokenreduce.apply(build("vit"), "dtome")
    assert "at most: the counts depend on the image" in tokenreduce.describe(model)
    with pytest.raises(ValueError, match=r"dtome has no thresholds: .*tokenreduce calibrate"), torch.no_grad():
        model(images())


def test_dtome_in_a_vlm_gives_each_image_its_count_and_refuses_anyres():
    # the VLM side (per-image placeholder counts, virtual unmerging) is tested with dymu in test_dymu.py
    model = tokenreduce.apply(tiny_llava(), "dtome", thresholds=0.5)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1] + [IMAGE_TOKEN] * 16 + [2] + [IMAGE_TOKEN] * 16]), pixel_values=pixels(2))
    assert [im.kept for im in tokenreduce.record(model).images] == [12, 10]
    with pytest.raises(TypeError, match=r"'dtome' leaves each crop its own token count"):
        tokenreduce.apply(tiny_vlm("llava_next"), "dtome", thresholds=0.5)


def test_fewer_tokens_than_planned_is_an_error_without_variable_counts():
    from tokenreduce.methods.dtome import DToMe

    class Fixed(DToMe):
        variable_counts = False

    model = tokenreduce.apply(build("vit"), Fixed(thresholds=0.5))
    with pytest.raises(RuntimeError, match=r"method dtome left \d+ tokens at layer 0, its schedule says 65"), torch.no_grad():
        model(images())


# -- DToMe: calibration ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["vit", "dinov2_reg", "no_cls_avg"])
def test_calibration_matches_naive_lockstep(model_name):
    model = build(model_name)
    batches = [images(batch=3, seed=4), images(batch=2, seed=5)]
    r = [5, 0, 8, 6]
    got = calibrate(model, batches, r=r)
    want = naive.calibrate_lockstep(model, batches, r)
    assert got["r"] == r and got["images"] == 5 and got["batches"] == 2 and got["thresholds"][1] is None
    for a, b in zip(got["thresholds"], want):
        assert (a is None and b is None) or a == pytest.approx(b, abs=1e-5)
    assert not tokenreduce.is_patched(model)


def test_calibration_on_single_images_hits_the_target_per_image():
    model = build("vit")
    x = images(batch=1, seed=9)
    thresholds = calibrate(model, [x], r=4)["thresholds"]
    tokenreduce.apply(model, "dtome", thresholds=thresholds)
    with torch.no_grad():
        model(x)
    assert tokenreduce.record(model).tokens_per_layer == (61, 57, 53, 49)  # r = 4 in every block, as calibrated


def test_calibration_schedule_and_errors():
    model = build("vit")
    got = calibrate(model, [images(batch=2)], keep_ratio=0.5)
    assert got["r"] == [8, 8, 8, 8] and got["input_tokens"] == 65
    assert calibrate(model, [images(batch=2)], r=(4, -1.0))["r"] == [8, 5, 2, 0]
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate(model, [], r=2)
    with pytest.raises(ValueError, match="pass r or keep_ratio"):
        calibrate(model, [images()])


# -- the command ------------------------------------------------------------------------------------------


@pytest.fixture
def image_dir(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(5):
        pixels = (torch.rand(40 + 4 * i, 48, 3, generator=gen) * 255).to(torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / ("sub" if i % 2 else "") / f"img{i}.png")
    return folder


CALIBRATE = ["calibrate", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--threads", "1", "--quiet"]
R12 = ["--r", "[2, 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]", "--batch-size", "2"]


def test_cli_calibrate_writes_thresholds_dtome_loads(image_dir, tmp_path, capsys):
    from tokenreduce.cli import main
    from tokenreduce.loading import create_timm_model

    out = tmp_path / "thresholds.json"
    torch.manual_seed(0)  # the random weights
    assert main([*CALIBRATE, str(image_dir), *R12, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "5 images in 3 batches of up to 2 at 64 px" in printed and "images/s" in printed and "wrote" in printed
    data = json.loads(out.read_text())
    assert data["format"] == "dtome-thresholds" and data["model"] == "vit_tiny_patch16_224" and data["weights"] == "random"
    assert data["images"] == 5 and data["r"][:4] == [2, 2, 1, 1] and data["tokenreduce"] == tokenreduce.__version__
    assert len(data["thresholds"]) == 12 and data["thresholds"][4:] == [None] * 8
    assert all(0 <= t <= 1 for t in data["thresholds"][:4]) and data["input_tokens"] == 17
    # deterministic: the same weights and images give the same thresholds
    again = tmp_path / "again.json"
    torch.manual_seed(0)
    main([*CALIBRATE, str(image_dir), *R12, "--out", str(again)])
    assert json.loads(again.read_text())["thresholds"] == data["thresholds"]
    model = tokenreduce.apply(create_timm_model("vit_tiny_patch16_224", img_size=64).eval(), "dtome", thresholds=str(out))
    assert patch_of(model).method.thresholds == data["thresholds"]
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert tokenreduce.record(model).tokens_per_layer[-1] <= 17


def test_cli_calibrate_on_a_hugging_face_tower(image_dir, tmp_path, capsys):
    from tokenreduce.cli import main

    tower = tmp_path / "tower"
    build("hf_clip").save_pretrained(tower)
    out = tmp_path / "t.json"
    assert main(["calibrate", str(image_dir), "--checkpoint", str(tower), "--r", "3", "--quiet", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["img_size"] == 32 and data["input_tokens"] == 65 and data["r"] == [3, 3, 3, 3]
    assert all(t is not None and math.isfinite(t) for t in data["thresholds"])


def test_cli_calibrate_checks_before_building(image_dir, tmp_path, capsys, monkeypatch):
    import tokenreduce.cli as cli

    monkeypatch.setattr(cli, "create_timm_model", lambda *a, **k: pytest.fail("a model was built before the request was checked"))

    def fails(argv) -> str:
        with pytest.raises(SystemExit) as err:
            cli.main(argv)
        assert err.value.code == 2
        return capsys.readouterr().err

    assert "--r must be an int, a list" in fails([*CALIBRATE, str(image_dir), "--r", "two"])
    assert "pass r or keep_ratio, not both" in fails([*CALIBRATE, str(image_dir), "--r", "2", "--keep-ratio", "0.5"])
    assert "--batch-size must be an integer >= 1, got 0" in fails([*CALIBRATE, str(image_dir), "--batch-size", "0"])
    assert "not a directory" in fails([*CALIBRATE, str(tmp_path / "none")])
    assert "--out" in fails([*CALIBRATE, str(image_dir), "--out", str(tmp_path / "no" / "t.json")])
