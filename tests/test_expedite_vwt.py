"""Expedite and VWT against naive implementations from the specification; their schedules, configs,
dense outputs, and the input-pixel capture they rely on."""

from __future__ import annotations

import threading

import pytest
import torch

import naive_expedite_vwt as naive
import reference
import tokenreduce
from conftest import build, images, output, use_eager_attention
from tokenreduce.adapters import locate
from tokenreduce.core import (
    adaptive_pool_matrix,
    knn_reconstruction_weights,
    local_soft_kmeans,
    mix,
    pad_prefix,
    patchify,
    top_k_positions,
)


def eager(name: str, **overrides):
    model = build(name, **overrides)
    use_eager_attention(model)
    return model


def kept_patches(model) -> list[list[int]]:
    """Per image, the patch positions (after the prefix) whose tokens survived, from the record."""
    rec = tokenreduce.record(model)
    p = rec.num_prefix
    return [[i - p for i in range(p, rec.input_tokens) if rec.owner[b, i] >= 0] for b in range(rec.owner.shape[0])]


# -- Expedite: core steps ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "grid,cells,iters,window,tau",
    [((8, 8), (6, 6), 5, 5, 0.02), ((8, 12), (4, 6), 3, 3, 0.1), ((7, 5), (3, 4), 2, 1, 0.5), ((6, 6), (3, 3), 0, 5, 0.02)],
)
def test_local_soft_kmeans_matches_naive(grid, cells, iters, window, tau):
    x = torch.randn(2, grid[0] * grid[1], 16, generator=torch.Generator().manual_seed(0)) * 3
    matrix = local_soft_kmeans(x, grid, cells, iters, window, tau)
    assert matrix.shape == (2, cells[0] * cells[1], grid[0] * grid[1])
    for b in range(2):
        want = naive.soft_kmeans(x[b], grid, cells, iters, window, tau)
        torch.testing.assert_close((matrix[b] @ x[b]).double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k,norm", [(5, "l2"), (5, "sum"), (None, "l2"), (1, "l2")])
def test_knn_reconstruction_weights_match_naive(k, norm):
    gen = torch.Generator().manual_seed(1)
    x, centroids = torch.randn(2, 20, 8, generator=gen) * 2, torch.randn(2, 9, 8, generator=gen) * 2
    got = knn_reconstruction_weights(x, centroids, k, 0.1, norm)
    for b in range(2):
        want = naive.reconstruction_weights(x[b], centroids[b], k, 0.1, norm)
        torch.testing.assert_close(got[b].double(), want, rtol=1e-5, atol=1e-6)


def test_reconstruction_weights_survive_where_the_references_exp_underflows():
    x, centroids = torch.full((1, 1, 4), 100.0), torch.tensor([[[0.0] * 4, [1.0] * 4]])  # |x - c|^2 ~ 4e4
    weights = knn_reconstruction_weights(x, centroids, 2, 0.02, "l2")
    assert torch.isfinite(weights).all() and weights.norm(dim=-1).item() == pytest.approx(1.0)
    assert torch.exp(-0.02 * ((x - centroids) ** 2).sum(-1)).max() == 0  # the reference's weights: all zero


# -- Expedite: the model --------------------------------------------------------------------------------
NAIVE_DEFAULTS = dict(iters=5, window=5, tau=0.02, k=20, recon_tau=0.02, norm="l2", reconstruct=True)


@pytest.mark.parametrize("model_name", ["vit", "dinov2_reg", "deit_distilled", "qknorm_avg", "no_cls_avg"])
def test_expedite_model_matches_naive(model_name):
    model, x = eager(model_name), images(batch=2)
    want, _ = naive.expedite_forward(model, x, location=1, cells=(6, 6), **NAIVE_DEFAULTS)
    tokenreduce.apply(model, "expedite")  # depth 4: clusters after block 1, 6 x 6 of the 8 x 8 grid
    torch.testing.assert_close(output(model, x), want, rtol=1e-4, atol=1e-4)
    p = model.num_prefix_tokens
    assert tokenreduce.record(model).tokens_per_layer == (64 + p, 36 + p, 36 + p, 64 + p)


@pytest.mark.parametrize("model_name", ["vit", "dinov2_reg"])
def test_expedite_without_reconstruction_and_other_settings_match_naive(model_name):
    model, x = eager(model_name, depth=6), images(batch=2)
    config = dict(location=2, clusters=(4, 5), n_iters=3, window_size=3, tau=0.05, reconstruct=False, recon_k=4, recon_norm="sum")
    settings = dict(iters=3, window=3, tau=0.05, k=4, recon_tau=0.02, norm="sum", reconstruct=False)
    want, _ = naive.expedite_forward(model, x, location=2, cells=(4, 5), **settings)
    tokenreduce.apply(model, "expedite", **config)
    torch.testing.assert_close(output(model, x), want, rtol=1e-4, atol=1e-4)
    p = model.num_prefix_tokens
    assert tokenreduce.record(model).tokens_per_layer == (64 + p, 64 + p, 20 + p, 20 + p, 20 + p, 20 + p)


def test_expedite_on_a_non_square_grid_takes_the_grid_from_the_image():
    model, x = eager("vit", img_size=(32, 48)), torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(4))
    want, _ = naive.expedite_forward(model, x, location=1, cells=(4, 6), **NAIVE_DEFAULTS)
    tokenreduce.apply(model, "expedite", clusters=(4, 6))
    torch.testing.assert_close(output(model, x), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"96 patch tokens are not a square grid.*pass clusters=\(h, w\)"):
        tokenreduce.apply(model, "expedite")


def test_expedite_dense_head_gets_its_own_reconstruction():
    """forward_intermediates (NCHW) rebuilds the clustered blocks' tokens with Expedite's kNN weights,
    not by copying each centroid to the tokens it holds most of."""
    model, x = eager("dinov2_reg"), images(batch=2)
    p = model.num_prefix_tokens
    _, trace = naive.expedite_forward(model, x, location=1, cells=(6, 6), **NAIVE_DEFAULTS)
    tokenreduce.apply(model, "expedite")
    with torch.no_grad():
        _, grids = model.forward_intermediates(x, indices=[1, 2, 3])
    rec = tokenreduce.record(model)
    assert rec.tokens_per_layer == (69, 41, 41, 69)
    for b, (after, memo) in enumerate(trace):
        for block, grid in zip([1, 2], grids):  # clustered tokens, spread back by the weights
            want = (memo["weights"] @ after[block][p:].double()).float()
            torch.testing.assert_close(grid[b].flatten(1).T, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grids[2][b].flatten(1).T, after[3][p:], rtol=1e-4, atol=1e-4)  # rebuilt in the model


@pytest.mark.parametrize(
    "tokens,prefix,depth,config,plan",
    [
        # DeiT-S: blocks 0-4 at full resolution (alpha = 5 of 12), 10 x 10 clusters of 14 x 14, all 197 rebuilt
        (197, 1, 12, {}, [197] * 4 + [101] * 7 + [197]),
        (197, 1, 12, dict(reconstruct=False), [197] * 4 + [101] * 8),
        # the reference's Segmenter ViT-L/16 configs: ADE20K 640 px (the defaults), Cityscapes 768, Pascal Context 480
        (1601, 1, 24, {}, [1601] * 9 + [785] * 14 + [1601]),
        (1601, 1, 24, dict(location=9, clusters=784), [1601] * 9 + [785] * 14 + [1601]),
        (2305, 1, 24, dict(location=11, clusters=1024), [2305] * 11 + [1025] * 12 + [2305]),
        (901, 1, 24, dict(location=13, clusters=400), [901] * 13 + [401] * 10 + [901]),
        # SWAG ViT-L/16 at 512 px, README alpha 12 (its clustering_location), 23 x 23, no reconstruction
        (1025, 1, 24, dict(location=12, clusters=529, reconstruct=False), [1025] * 12 + [530] * 12),
        (1374, 5, 12, dict(clusters=(20, 30)), [1374] * 4 + [605] * 7 + [1374]),
    ],
)
def test_expedite_schedule(tokens, prefix, depth, config, plan):
    assert tokenreduce.make_method("expedite", **config).schedule(tokens, prefix, depth) == plan


@pytest.mark.parametrize(
    "config,error,match",
    [
        (dict(location=-1), ValueError, r"location must be an integer >= 0"),
        (dict(location=1, alpha_ratio=0.5), ValueError, "pass location or alpha_ratio, not both"),
        (dict(alpha_ratio=1.0), ValueError, r"alpha_ratio must be a number in \(0, 1\)"),
        (dict(clusters=10), ValueError, "must be a square number"),
        (dict(clusters=(3, 0)), ValueError, r"clusters\[1\] must be an integer >= 1"),
        (dict(clusters=(2, 3, 4)), ValueError, r"must be \(h, w\)"),
        (dict(clusters=16, cluster_ratio=0.5), ValueError, "pass clusters or cluster_ratio, not both"),
        (dict(cluster_ratio=1.5), ValueError, r"cluster_ratio must be a number in \(0, 1\]"),
        (dict(n_iters=-1), ValueError, "n_iters must be an integer >= 0"),
        (dict(window_size=4), ValueError, "window_size must be an odd integer >= 1"),
        (dict(tau=0), ValueError, r"tau must be a number > 0"),
        (dict(recon_k=0), ValueError, "recon_k must be an integer >= 1"),
        (dict(recon_tau=-1.0), ValueError, r"recon_tau must be a number > 0"),
        (dict(recon_norm="max"), ValueError, r"recon_norm must be one of \('l2', 'sum'\)"),
        (dict(reconstruct=1), TypeError, "reconstruct must be True or False"),
    ],
)
def test_expedite_rejects_bad_configs(config, error, match):
    with pytest.raises(error, match=match):
        tokenreduce.make_method("expedite", **config)


@pytest.mark.parametrize(
    "config,match",
    [
        (dict(location=3), r"location must be a block index in \[0, 2\] for this 4-block model with reconstruct=True"),
        (dict(location=4, reconstruct=False), r"location must be a block index in \[0, 3\]"),
        (dict(alpha_ratio=0.99), r"alpha_ratio=0.99 clusters after block 3 of 4; .* lower alpha_ratio"),
        (dict(clusters=81), r"clusters=9x9 exceeds the 64 patch tokens"),
        (dict(clusters=16), r"recon_k must be in \[1, 16\] \(the 4x4 clusters\), got 20"),
    ],
)
def test_expedite_rejects_configs_the_model_cannot_plan(config, match):
    with pytest.raises(ValueError, match=match):
        tokenreduce.apply(build("vit"), "expedite", **config)


# -- VWT -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["vit", "dinov2_reg", "deit_distilled", "qknorm_avg", "no_cls_avg", "respost"])
def test_vwt_keeps_the_highest_variance_patches_and_matches_naive(model_name):
    model, x = eager(model_name), images(batch=3)
    x[1, :, :20] = 0.5  # 40 flat patches (rows 0-4): equal (zero) variances, the first 2 kept
    keep = 26  # ceil(0.4 * 64)
    tokenreduce.apply(model, "vwt", keep_ratio=0.4)
    got = output(model, x)
    assert kept_patches(model) == [naive.vwt_keep(x[b], 4, keep) for b in range(3)]
    if model_name != "respost":  # the naive forward is pre-norm
        want, _ = naive.vwt_forward(model, x, keep)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_name", ["hf_clip", "hf_siglip", "hf_dinov2", "hf_vit"])
def test_vwt_on_hf_towers_reads_the_pixels_their_embeddings_see(model_name):
    model, x = build(model_name), images(batch=2)
    tokenreduce.apply(model, "vwt", drop=40)
    got = output(model, x)
    assert kept_patches(model) == [naive.vwt_keep(x[b], 4, 24) for b in range(2)]
    # the same as feeding the tower's own layers the kept embeddings
    p = tokenreduce.record(model).num_prefix
    tokenreduce.remove(model)
    final = reference.HF_PARTS[type(model).__name__][-1]
    with torch.no_grad():
        tokens = model.embeddings(x)
        if hasattr(model, "pre_layrnorm"):
            tokens = model.pre_layrnorm(tokens)
        kept = torch.stack([torch.cat([t[:p], t[[p + i for i in naive.vwt_keep(x[b], 4, 24)]]]) for b, t in enumerate(tokens)])
        for layer in locate(model)[2].blocks(model):
            kept = layer(kept, None)
        want = getattr(model, final)(kept) if final else kept
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "tokens,prefix,config,count",
    [(197, 1, {}, 99), (197, 1, dict(drop=50), 147), (197, 1, dict(keep_ratio=0.7), 139), (1374, 5, dict(drop=0), 1374)],
)
def test_vwt_schedule(tokens, prefix, config, count):
    assert tokenreduce.make_method("vwt", **config).schedule(tokens, prefix, 12) == [count] * 12


@pytest.mark.parametrize(
    "config,error,match",
    [
        (dict(keep_ratio=0.0), ValueError, r"keep_ratio must be a number in \(0, 1\]"),
        (dict(drop=-1), ValueError, "drop must be an integer >= 0"),
        (dict(drop=2.5), TypeError, "drop must be an integer"),
        (dict(keep_ratio=0.5, drop=3), ValueError, "pass keep_ratio or drop, not both"),
    ],
)
def test_vwt_rejects_bad_configs(config, error, match):
    with pytest.raises(error, match=match):
        tokenreduce.make_method("vwt", **config)


def test_vwt_drop_must_leave_a_patch():
    with pytest.raises(ValueError, match=r"drop must be in \[0, 63\] for 64 patch tokens, got 64"):
        tokenreduce.apply(build("vit"), "vwt", drop=64)


def test_vwt_refuses_tokens_that_did_not_come_through_the_patch_embedding():
    model, x = build("vit"), images()
    tokenreduce.apply(model, "vwt")
    output(model, x)  # leaves nothing behind for the next call
    with torch.no_grad():
        tokens = model._pos_embed(model.patch_embed(x))
        tokenreduce.remove(model)
        tokenreduce.apply(model, "vwt")
        with pytest.raises(ValueError, match="reads the input pixels, which were not captured"):
            model.blocks(tokens)


def test_pixel_capture_is_per_thread_and_removed_without_trace():
    model = build("vit")
    proj_class = type(model.patch_embed.proj)
    tokenreduce.apply(model, "vwt")
    assert type(model.patch_embed.proj) is not proj_class
    xs = [images(batch=1 + i % 2, seed=i) for i in range(6)]
    want = [(output(model, x), kept_patches(model)) for x in xs]
    barrier, got = threading.Barrier(6), [None] * 6

    def worker(i):
        barrier.wait()
        for _ in range(3):
            got[i] = (output(model, xs[i]), kept_patches(model))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (out, kept), (want_out, want_kept) in zip(got, want):
        assert torch.equal(out, want_out) and kept == want_kept
    tokenreduce.remove(model)
    assert type(model.patch_embed.proj) is proj_class and "_tokenreduce" not in vars(model.patch_embed.proj)


def test_patchify_gives_each_patch_tokens_pixels():
    image = torch.randn(2, 3, 8, 12)
    conv = torch.nn.Conv2d(3, 5, 4, 4)
    want = conv(image).flatten(2).transpose(1, 2)
    torch.testing.assert_close(patchify(image, (4, 4)) @ conv.weight.flatten(1).T + conv.bias, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grid,cells", [((8, 8), (6, 6)), ((14, 14), (10, 10)), ((7, 5), (3, 4)), ((4, 4), (6, 6))])
def test_adaptive_pool_matrix_is_adaptive_avg_pool2d(grid, cells):
    x = torch.randn(2, 3, *grid)
    want = torch.nn.functional.adaptive_avg_pool2d(x, cells).flatten(2)
    torch.testing.assert_close(x.flatten(2) @ adaptive_pool_matrix(grid, cells).T, want)


def test_top_k_positions_breaks_ties_toward_the_lower_position():
    scores = torch.tensor([[1.0, 3, 3, 0, 3, 2], [5, 5, 5, 5, 5, 5]])
    assert top_k_positions(scores, 2).tolist() == [[1, 2], [0, 1]]
    assert top_k_positions(scores, 4).tolist() == [[1, 2, 4, 5], [0, 1, 2, 3]]


def test_pad_prefix_passes_the_prefix_through():
    x, matrix = torch.randn(2, 7, 4), torch.rand(2, 3, 5)
    got = mix(pad_prefix(matrix, 2)).apply(x)
    torch.testing.assert_close(got, torch.cat([x[:, :2], matrix @ x[:, 2:]], dim=1))
