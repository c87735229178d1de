"""K-Medoids, DPC-KNN and Token Pooling against the naive oracles of ``naive_clustering_methods``: the clustering steps on
random tokens, whole tiny timm models with eager attention, the reference token counts, and bad configs."""

from __future__ import annotations

import pytest
import torch

import naive_clustering_methods as naive
import tokenreduce
from conftest import build, images, use_eager_attention
from tokenreduce.core import (
    cluster_selection,
    density_peaks,
    farthest_first,
    hash_scores,
    kmedoids,
    pairwise_distances,
    stable_order,
    weighted_kmeans,
)


def tokens(batch: int, n: int, c: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, n, c, generator=torch.Generator().manual_seed(seed)) * 3


def weights(batch: int, n: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, n, generator=torch.Generator().manual_seed(seed + 100)) + 0.01


# -- the clustering steps on random tokens ---------------------------------------------------------------


def test_pairwise_distances_are_euclidean_with_an_exact_zero_diagonal():
    x = tokens(2, 30, 16, 0) + 50  # far from the origin: the centring keeps the Gram form accurate
    dist = pairwise_distances(x)
    torch.testing.assert_close(dist, torch.cdist(x.double(), x.double()).float(), rtol=1e-4, atol=1e-4)
    assert torch.equal(dist.diagonal(dim1=1, dim2=2), torch.zeros(2, 30))
    y = tokens(2, 5, 16, 1)
    want = torch.cdist(x.double(), y.double()).float()
    torch.testing.assert_close(pairwise_distances(x, y), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pairwise_distances(x, y, squared=True), want**2, rtol=1e-4, atol=1e-3)


def test_stable_order_ranks_ties_by_position():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.9, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    assert stable_order(scores)[:, :4].tolist() == [[1, 4, 0, 2], [0, 1, 2, 3]]
    w = weights(3, 50, 0)
    assert stable_order(w)[:, :50].tolist() == [naive.by_weight(row.tolist(), 50) for row in w]


@pytest.mark.parametrize("cost", ["all", "cluster"])
@pytest.mark.parametrize("p,k", [(20, 7), (33, 32), (12, 1)])
def test_haurum_kmedoids_matches_naive(cost, p, k):
    x, w = tokens(3, p, 8, p + k), weights(3, p, p + k)
    init = stable_order(w)[:, :k]
    medoids, assignment = kmedoids(pairwise_distances(x), init, 3, candidate_weight=w, within_cluster=cost == "cluster")
    for b in range(3):
        want_medoids, want_assignment = naive.haurum_kmedoids(x[b], w[b].tolist(), k, 3, cost)
        assert medoids[b].tolist() == want_medoids
        assert assignment[b].tolist() == want_assignment


@pytest.mark.parametrize("first", [0, 5])
def test_equal_weight_greedy_start_matches_naive(first):
    x = tokens(3, 24, 8, first)
    dist = pairwise_distances(x)
    init = farthest_first(dist, torch.tensor(first), 9)
    medoids, assignment = kmedoids(dist, init, 3, within_cluster=False)
    for b in range(3):
        want_medoids, want_assignment = naive.haurum_kmedoids(x[b], None, 9, 3, "all", first)
        assert medoids[b].tolist() == want_medoids
        assert assignment[b].tolist() == want_assignment


def test_seeded_first_medoid_is_the_hash_written_out():
    for key in (0, 3, 1_000_006):
        assert int(hash_scores(64, key).argmax()) == naive.seeded_position(64, key)


@pytest.mark.parametrize("p,k,neighbours", [(30, 9, 5), (16, 16, 5), (25, 4, 1), (40, 3, 40)])
def test_density_peaks_matches_naive_and_one_sample_form(p, k, neighbours):
    x = tokens(3, p, 12, p * k)
    assignment, centres = density_peaks(x, k, neighbours)
    for b in range(3):
        want_centres, want_assignment = naive.dpc_knn(x[b], k, neighbours)
        assert centres[b].tolist() == want_centres
        assert assignment[b].tolist() == want_assignment
        one_assignment, one_centres = density_peaks(x[b], k, neighbours)  # SparseVLM's one-sample call
        assert torch.equal(one_assignment, assignment[b]) and torch.equal(one_centres, centres[b])


def test_density_peaks_breaks_ties_by_position():
    x = torch.zeros(1, 6, 4)  # every density and distance equal: the earlier token is denser
    assignment, centres = density_peaks(x, 3, 2)
    assert centres.tolist() == [[0, 1, 2]] and assignment.tolist() == [[0, 1, 2, 0, 0, 0]]


@pytest.mark.parametrize("p,k", [(24, 6), (40, 13)])
def test_token_pooling_kmedoids_matches_naive(p, k):
    x, w = tokens(3, p, 8, p), weights(3, p, p)
    init = stable_order(w)[:, :k]
    medoids, assignment = kmedoids(pairwise_distances(x, squared=True), init, 5, member_weight=w)
    for b in range(3):
        want_medoids, want_assignment = naive.pooling_kmedoids(x[b], w[b].tolist(), init[b].tolist(), 5)
        assert medoids[b].tolist() == want_medoids
        assert assignment[b].tolist() == want_assignment


@pytest.mark.parametrize("p,k", [(24, 6), (40, 13)])
def test_token_pooling_kmeans_matches_naive(p, k):
    x, w = tokens(3, p, 8, p), weights(3, p, p)
    init = stable_order(w)[:, :k]
    assignment, coeff = weighted_kmeans(x, w, init, 5)
    pooled = cluster_selection(assignment, init, 0, coeff).apply(x)
    for b in range(3):
        want_assignment, want_centres = naive.pooling_kmeans(x[b], w[b].tolist(), init[b].tolist(), 5)
        assert assignment[b].tolist() == want_assignment
        torch.testing.assert_close(pooled[b].double(), want_centres, rtol=1e-5, atol=1e-5)


def test_medoid_selection_outputs_the_medoids_and_covers_their_clusters():
    x = tokens(2, 10, 4, 0)
    assignment = torch.tensor([[0, 1, 1, 0, 2, 2, 2, 1, 0, 0], [2, 2, 1, 0, 0, 1, 2, 2, 0, 1]])
    medoids = torch.tensor([[3, 2, 6], [4, 5, 1]])
    selection = cluster_selection(assignment, medoids, 2)
    prefixed = torch.cat([torch.randn(2, 2, 4), x], dim=1)
    out = selection.apply(prefixed)
    assert torch.equal(out[:, :2], prefixed[:, :2])
    assert torch.equal(out[:, 2:], x.gather(1, medoids[..., None].expand(-1, -1, 4)))
    sizes = selection.sizes(torch.ones(2, 12, 1))[..., 0]
    assert sizes.tolist() == [[1, 1, 4, 3, 3], [1, 1, 3, 3, 4]]
    back = selection.unmerge(out)  # each member takes its medoid
    assert torch.equal(back[:, 2:], out[:, 2:].gather(1, (assignment + 0)[..., None].expand(-1, -1, 4)))


# -- whole models against the naive forward --------------------------------------------------------------


def model_and_images(model_name: str):
    model, x = build(model_name), images(batch=3)
    use_eager_attention(model)
    return model, x, model.num_prefix_tokens


def patched(model, x, method: str, **config) -> torch.Tensor:
    tokenreduce.apply(model, method, **config)
    with torch.no_grad():
        return model(x)


def clustering_layers(model) -> tuple[int, ...]:
    depth = len(model.blocks)
    return tuple(sorted({i * depth // 12 for i in (3, 6, 9)}))


MODELS = ["vit", "dinov2_reg", "deit_distilled", "qknorm_avg", "no_cls_avg"]


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("config", [{}, dict(cost="cluster", keep_rate=0.6), dict(equal_weight=True, seed=4)], ids=str)
def test_kmedoids_model_matches_naive(model_name, config):
    model, x, prefix = model_and_images(model_name)
    keep_rate = config.get("keep_rate", 0.7)
    layers = clustering_layers(model)
    patches = 64

    def start(layer, t, previous, size):
        if layer not in layers:
            return t, size
        k = int(patches * keep_rate ** (layers.index(layer) + 1))
        patch = t[prefix:]
        if config.get("equal_weight"):
            first = naive.seeded_position(patch.shape[0], config["seed"] * 1_000_003 + layer)
            medoids, assignment = naive.haurum_kmedoids(patch, None, k, 3, "all", first)
        else:
            weight = naive.received(previous)[prefix:]
            medoids, assignment = naive.haurum_kmedoids(patch, weight, k, 3, config.get("cost", "all"))
        return naive.clustered(t, size, prefix, assignment, [patch[m] for m in medoids])

    want = naive.vit_forward(model, x, start=start)
    got = patched(model, x, "kmedoids", **config)
    counts = [prefix + int(64 * keep_rate ** (j + 1)) for j in range(3)]
    assert tokenreduce.record(model).tokens_per_layer == (prefix + 64, *counts)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("neighbours", [5, 2])
def test_dpc_knn_model_matches_naive(model_name, neighbours):
    model, x, prefix = model_and_images(model_name)
    layers, keep_rate = clustering_layers(model), 0.6

    def start(layer, t, previous, size):
        if layer not in layers:
            return t, size
        patch = t[prefix:]
        centres, assignment = naive.dpc_knn(patch, int(64 * keep_rate ** (layers.index(layer) + 1)), neighbours)
        means = [patch[[i for i in range(len(assignment)) if assignment[i] == c]].double().mean(0) for c in range(len(centres))]
        return naive.clustered(t, size, prefix, assignment, means)

    want = naive.vit_forward(model, x, start=start)
    got = patched(model, x, "dpc_knn", keep_rate=keep_rate, neighbours=neighbours)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("algorithm", ["kmedoids", "kmeans"])
@pytest.mark.parametrize("weighted", [True, False])
def test_token_pooling_model_matches_naive(model_name, algorithm, weighted):
    model, x, prefix = model_and_images(model_name)
    counts = [50, 50, 33, 20]  # block 1 pools nothing; the last block pools too

    def end(layer, t, probs, size):
        k = counts[layer]
        patch = t[prefix:]
        if k == patch.shape[0]:
            return t, size
        significance = naive.received(probs)[prefix:]
        weight = significance if weighted else [1.0] * len(significance)
        init = naive.by_weight(significance, k)
        if algorithm == "kmeans":
            assignment, centres = naive.pooling_kmeans(patch, weight, init, 5)
            return naive.clustered(t, size, prefix, assignment, list(centres))
        medoids, assignment = naive.pooling_kmedoids(patch, weight, init, 5)
        return naive.clustered(t, size, prefix, assignment, [patch[m] for m in medoids])

    want = naive.vit_forward(model, x, end=end)
    got = patched(model, x, "token_pooling", tokens=counts, algorithm=algorithm, weighted=weighted)
    assert tokenreduce.record(model).tokens_per_layer == tuple(prefix + c for c in counts)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["kmedoids", "dpc_knn", "token_pooling"])
def test_restore_copies_each_centre_to_its_cluster(method):
    model = build("dinov2_reg")
    tokenreduce.apply(model, method)
    with torch.no_grad():
        model(images())
    rec = tokenreduce.record(model)
    final = torch.randn(2, rec.num_tokens, 5)
    restored = rec.restore(final)
    assert restored.shape == (2, 69, 5)
    assert (rec.owner >= 0).all(), "a clustering covers every token"
    assert torch.equal(restored, final.gather(1, rec.owner[..., None].expand(-1, -1, 5)))
    assert torch.equal(rec.size[..., 0], rec.source.sum(dim=-1))


# -- schedules, defaults and identities ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["kmedoids", "dpc_knn"])
def test_haurum_counts_on_deit_small(method):
    plan = tokenreduce.make_method(method).schedule(197, 1, 12)
    assert plan == [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3  # int(196 * 0.7^j) patches: 137, 96, 67
    # the real patch count, not the reference's hard-coded 196: 518 px DINOv2, 4 registers
    assert tokenreduce.make_method(method).schedule(1374, 5, 12)[-1] == 5 + int(1369 * 0.7**3)
    assert tokenreduce.make_method(method, clusters=[100, 50, 10]).schedule(197, 1, 12)[::3] == [197, 101, 51, 11]
    assert tokenreduce.make_method(method, layers=[2, 5]).schedule(65, 1, 6) == [65, 65, 45, 45, 45, 32]


def analytic_gmacs(entering: list[int], width: int = 384) -> float:
    """The spec's MAC model with attention and MLP on the tokens entering each block (reduction at its end)."""
    blocks = sum(4 * n * width**2 + 2 * n * n * width + 8 * n * width**2 for n in entering)
    return (blocks + 196 * 768 * width + width * 1000) / 1e9


def test_token_pooling_default_schedule_on_deit_small():
    plan = tokenreduce.make_method("token_pooling").schedule(197, 1, 12)
    assert plan == [181, 166, 153, 141, 130, 119, 110, 101, 93, 86, 79, 79]  # with the class token
    gmacs = analytic_gmacs([197, *plan[:-1]])
    assert 2.9 <= gmacs <= 3.0 and round(gmacs, 2) == 2.98
    assert analytic_gmacs([197] * 12) == pytest.approx(4.599, abs=1e-3)
    # scaled to depth: the same fraction left before the last block of a 24-block model
    assert tokenreduce.make_method("token_pooling").schedule(197, 1, 24)[-2] == 1 + int(196 * 0.92**11.5)


@pytest.mark.parametrize(
    "method,config",
    [("kmedoids", dict(keep_rate=1.0)), ("dpc_knn", dict(keep_rate=1.0)), ("token_pooling", dict(tokens=[64] * 4))],
)
def test_identity_configs_equal_the_unpatched_model(method, config):
    model, x = build("dinov2_reg"), images()
    with torch.no_grad():
        want = model(x)
        with tokenreduce.applied(model, method, **config):
            assert torch.equal(model(x), want)


@pytest.mark.parametrize(
    "method,config,error,match",
    [
        ("kmedoids", dict(keep_rate=0), ValueError, r"keep_rate must be a number in \(0, 1\]"),
        ("kmedoids", dict(keep_rate=1.5), ValueError, r"keep_rate must be a number in \(0, 1\]"),
        ("kmedoids", dict(cost="mean"), ValueError, r"cost must be one of \('all', 'cluster'\)"),
        ("kmedoids", dict(iterations=-1), ValueError, r"iterations must be an integer >= 0"),
        ("kmedoids", dict(equal_weight=1), TypeError, r"equal_weight must be True or False"),
        ("kmedoids", dict(layers=[0, 3]), ValueError, r"layers must be >= 1 .* or pass equal_weight=True"),
        ("kmedoids", dict(clusters=[0, 3]), ValueError, r"clusters\[0\] must be an integer >= 1"),
        ("dpc_knn", dict(neighbours=0), ValueError, r"neighbours must be an integer >= 1"),
        ("token_pooling", dict(algorithm="kmedian"), ValueError, r"algorithm must be one of \('kmedoids', 'kmeans'\)"),
        ("token_pooling", dict(iterations=0), ValueError, r"iterations must be an integer >= 1"),
        ("token_pooling", dict(keep_rate=0.0), ValueError, r"keep_rate must be a number in \(0, 1\]"),
        ("token_pooling", dict(tokens=[10, 0]), ValueError, r"tokens\[1\] must be an integer >= 1"),
    ],
)
def test_bad_configs_raise_with_ranges(method, config, error, match):
    with pytest.raises(error, match=match):
        tokenreduce.make_method(method, **config)


@pytest.mark.parametrize(
    "method,config,args,match",
    [
        ("kmedoids", dict(keep_rate=0.01), (65, 1, 4), r"keep_rate must be in \[0\.25, 1\] for this input"),
        ("kmedoids", dict(clusters=[10, 20, 5]), (65, 1, 4), r"clusters must not exceed .* 20 at block 2, which receives 10"),
        ("kmedoids", dict(clusters=[10]), (65, 1, 4), r"clusters must have one count per clustering layer \(1, 2, 3\), got 1"),
        ("kmedoids", dict(layers=[7]), (65, 1, 4), r"layers must be block indices in \[0, 3\]"),
        ("kmedoids", dict(), (65, 1, 2), r"the default layers at depth 2 include block 0"),
        ("dpc_knn", dict(neighbours=40), (65, 1, 4), r"neighbours must be at most the 31 patch tokens block 3 clusters"),
        ("token_pooling", dict(tokens=[50, 60, 30, 20]), (65, 1, 4), r"tokens must not increase: 60 after block 1"),
        ("token_pooling", dict(tokens=[50]), (65, 1, 4), r"tokens must have one count per block \(4\), got 1"),
        ("token_pooling", dict(keep_rate=0.01), (65, 1, 4), r"keep_rate must be in \[0\.629961, 1\] for 64 patch tokens"),
    ],
)
def test_configs_that_do_not_fit_the_input_raise(method, config, args, match):
    with pytest.raises(ValueError, match=match):
        tokenreduce.make_method(method, **config).schedule(*args)


def test_kmedoids_equal_weight_may_cluster_before_block_zero():
    plan = tokenreduce.make_method("kmedoids", equal_weight=True, layers=[0]).schedule(65, 1, 4)
    assert plan == [45, 45, 45, 45]
    model, x = build("vit"), images()
    patched(model, x, "kmedoids", equal_weight=True, layers=[0])
    assert tokenreduce.record(model).tokens_per_layer == (45, 45, 45, 45)


@pytest.mark.parametrize(
    "method,config",
    [("kmedoids", dict(equal_weight=True)), ("token_pooling", dict(algorithm="kmeans", iterations=2))],
    ids=str,
)
def test_variants_compile_without_graph_breaks(method, config):
    # the defaults compile in test_contract; these paths (greedy start, K-Means) do not run there
    model, x = build("dinov2_reg"), images(batch=3)
    tokenreduce.apply(model, method, **config)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
