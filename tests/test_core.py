"""Core tensor ops on hand-made inputs whose correct answer is known."""

from __future__ import annotations

import pytest
import torch

from tokenreduce.core import (
    best_match,
    bipartite_merge,
    bipartite_soft_matching,
    cell_argmax,
    cell_partition,
    cls_attention,
    corner_partition,
    hash_normal,
    hash_scores,
    keep,
    keep_and_fuse,
    keep_indices,
    random_cell_choice,
    row_max,
    split_keep_drop,
    weighted_mean_coeff,
)

# Positions 0..6 alternate A (even) / B (odd). Token 2 points the same way as 5, token 4 nearly as 1,
# token 6 is orthogonal to every B token. Token 0 (CLS) is identical to 1 but must never merge.
METRIC = torch.tensor(
    [
        [1.0, 0.0, 0.0, 0.0],  # 0 A, CLS
        [1.0, 0.0, 0.0, 0.0],  # 1 B
        [0.0, 1.0, 0.0, 0.0],  # 2 A -> 5 (cos 1)
        [0.0, 0.0, 1.0, 0.0],  # 3 B
        [0.9, 0.1, 0.0, 0.0],  # 4 A -> 1 (cos 0.994)
        [0.0, 2.0, 0.0, 0.0],  # 5 B
        [0.0, 0.0, 0.0, 1.0],  # 6 A, no partner
    ]
)[None]
X = torch.arange(7.0)[None, :, None] * 10  # token i carries the value 10 * i


def test_merges_the_most_similar_pairs_and_protects_cls():
    match = bipartite_soft_matching(METRIC, r=2, num_prefix=1)
    x, size = match.apply(X), match.sizes(torch.ones(1, 7, 1))
    # order: CLS, unmerged A (6), then B tokens 1, 3, 5 with 4 merged into 1 and 2 into 5
    assert x[0, :, 0].tolist() == [0.0, 60.0, 25.0, 30.0, 35.0]
    assert size[0, :, 0].tolist() == [1.0, 1.0, 2.0, 1.0, 2.0]
    assert match.index[0].tolist() == [0, 6, 1, 3, 5]  # a merged token inherits its B token's place


def test_merge_is_size_weighted():
    size = torch.tensor([1.0, 1.0, 1.0, 1.0, 3.0, 1.0, 1.0])[None, :, None]
    match = bipartite_soft_matching(METRIC, r=2, num_prefix=1, size=size)
    assert match.apply(X)[0, 2, 0].item() == pytest.approx((10 * 1 + 40 * 3) / 4)
    assert match.sizes(size)[0, 2, 0].item() == 4


def test_r1_takes_only_the_best_pair():
    x = bipartite_soft_matching(METRIC, r=1, num_prefix=1).apply(X)
    assert x[0, :, 0].tolist() == [0.0, 40.0, 60.0, 10.0, 30.0, 35.0]


def test_prefix_b_token_never_receives_a_merge():
    # With two prefix tokens (CLS, distillation), token 1 is protected: token 4 must not join it.
    match = bipartite_soft_matching(METRIC, r=2, num_prefix=2)
    x, size = match.apply(X), match.sizes(torch.ones(1, 7, 1))
    assert x[0, :2, 0].tolist() == [0.0, 10.0] and size[0, :2, 0].tolist() == [1.0, 1.0]
    assert size.sum() == 7


def test_owners_follow_merges():
    match = bipartite_soft_matching(METRIC, r=2, num_prefix=1)
    assert match.owners(torch.arange(7)[None]).tolist() == [[0, 2, 4, 3, 2, 4, 1]]


def test_unmerge_copies_each_output_back_to_its_inputs():
    match = bipartite_soft_matching(METRIC, r=2, num_prefix=1)
    restored = match.unmerge(match.apply(X))
    assert restored[0, :, 0].tolist() == [0.0, 25.0, 35.0, 30.0, 25.0, 35.0, 60.0]
    pruned = keep(torch.tensor([[0, 3]]), 4)
    assert pruned.unmerge(torch.tensor([[[1.0], [2.0]]]), fill=-1)[0, :, 0].tolist() == [1.0, -1.0, -1.0, 2.0]


def test_take_carries_aligned_tensors():
    match = bipartite_soft_matching(METRIC, r=2, num_prefix=1)
    positions = torch.arange(7) * 10
    assert match.take(positions).tolist() == [[0, 60, 10, 30, 50]]
    mask = torch.arange(14).view(1, 2, 7)  # [B, rows, N]: carried along dim 2
    assert match.take(mask, dim=2)[0, 1].tolist() == [7, 13, 8, 10, 12]


def test_r_out_of_range_names_the_range():
    with pytest.raises(ValueError, match=r"r must be in \[0, 3\]"):
        bipartite_soft_matching(METRIC, r=4, num_prefix=1)


def test_half_precision_merge_accumulates_in_fp32():
    x = torch.full((1, 7, 1), 60000.0, dtype=torch.float16)
    out = bipartite_soft_matching(METRIC, 2, 1).apply(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all() and (out == 60000).all()


def test_keep_and_drop_indices():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2]])
    assert keep_indices(scores, 2, num_prefix=1).tolist() == [[0, 2, 4]]
    keep, drop = split_keep_drop(scores, 2, num_prefix=1)
    assert keep.tolist() == [[0, 2, 4]] and drop.tolist() == [[1, 3, 5]]


def test_keep_and_fuse():
    x = torch.arange(12.0).reshape(1, 4, 3)
    kept = keep(torch.tensor([[3, 0]]), 4)
    assert kept.apply(x).tolist() == [[[9, 10, 11], [0, 1, 2]]] and kept.gather_only
    fused = keep_and_fuse(torch.tensor([[3]]), torch.tensor([[1, 2]]), torch.tensor([[0.5, 0.25]]), 4)
    assert fused.apply(x).tolist() == [[[9, 10, 11], [3 * 0.5 + 6 * 0.25, 4 * 0.5 + 7 * 0.25, 5 * 0.5 + 8 * 0.25]]]
    assert fused.sizes(torch.ones(1, 4, 1))[0, :, 0].tolist() == [1.0, 2.0]
    assert fused.owners(torch.arange(4)[None]).tolist() == [[-1, 1, 1, 0]]
    assert fused.index.tolist() == [[3, 1]]


def test_weighted_mean_coefficients():
    slot = torch.tensor([[0, 1, 0, -1, 1]])
    coeff = weighted_mean_coeff(slot, torch.tensor([[1.0, 2.0, 3.0, 9.0, 2.0]]), num_out=2)
    assert coeff.tolist() == [[0.25, 0.5, 0.75, 0.0, 0.5]]


def test_cls_attention_equals_the_full_attention_row():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 9, 4, generator=gen), torch.randn(2, 3, 9, 4, generator=gen)
    bias = torch.randn(2, 1, 1, 9, generator=gen)
    full = ((q @ k.transpose(-1, -2)) * 0.5 + bias).softmax(-1)
    torch.testing.assert_close(cls_attention(q, k, 0.5, bias), full[:, :, 0].mean(1))


@pytest.mark.parametrize("length", [7, 255, 256, 300, 1024, 1057])
def test_row_max_equals_torch_max(length):
    """Values and first-occurrence indices as torch.max gives them, through ties, -inf rows, NaN and a
    short last block (lengths not a multiple of the 32-entry blocks)."""
    g = torch.Generator().manual_seed(length)
    scores = torch.randn(2, 5, 40, length, generator=g).round(decimals=1)  # rounding makes ties common
    scores[0, 0, 0] = -torch.inf
    scores[0, 0, 1, length // 2] = scores[0, 0, 1, length - 1] = 9.0  # a tie of maxima, the first wins
    scores[1, 1, 2, length - 1] = 10.0  # the maximum in the short last block
    scores[1, 2, 3, length // 3] = scores[1, 2, 3, length - 2] = torch.nan
    values, indices = row_max(scores)
    want_values, want_indices = scores.max(dim=-1)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(values, want_values, rtol=0, atol=0, equal_nan=True)
    assert indices[0, 0, 1] == length // 2 and indices[1, 2, 3] == length // 3


def test_best_match_in_chunks_feeds_bipartite_merge_as_the_scores_would(monkeypatch):
    import tokenreduce.core.matching as matching

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 50, 8, generator=g), torch.randn(2, 20, 8, generator=g)
    whole = best_match(a, b)
    monkeypatch.setattr(matching, "_CHUNK_SCORES", 300)  # 7 chunks of 7 or 8 rows
    chunked = best_match(a, b)
    scores = a @ b.transpose(-1, -2)
    for got in (whole, chunked):
        assert all(torch.equal(x, y) for x, y in zip(got, scores.max(dim=-1)))
    a_index, b_index = torch.arange(50).expand(2, -1), torch.arange(50, 70).expand(2, -1)
    want = bipartite_merge(scores, a_index, b_index, 30, 70)
    got = bipartite_merge(None, a_index, b_index, 30, 70, best=chunked)
    assert torch.equal(got.slot, want.slot) and torch.equal(got.index, want.index)
    with pytest.raises(ValueError, match="scores or best"):
        bipartite_merge(None, a_index, b_index, 30, 70)


@pytest.mark.parametrize("grid,sx,sy", [((8, 8), 2, 2), ((7, 9), 2, 3), ((5, 5), 1, 1), ((3, 4), 4, 2)])
def test_cell_partition_takes_one_destination_per_whole_cell(grid, sx, sy):
    rows, cols = grid[0] // sy, grid[1] // sx
    choice = random_cell_choice((rows, cols), sx * sy, 7)
    src, dst = cell_partition(grid, sx, sy, choice)
    cells = [(i, j, int(choice[i, j])) for i in range(rows) for j in range(cols)]
    want = [(i * sy + c // sx) * grid[1] + j * sx + c % sx for i, j, c in cells]
    assert dst.tolist() == sorted(want)
    assert src.tolist() == [p for p in range(grid[0] * grid[1]) if p not in want]  # the ragged border included
    corner = corner_partition(grid, sx, sy)
    assert corner is corner_partition(grid, sx, sy)  # made once, shared
    assert [t.tolist() for t in corner] == [t.tolist() for t in cell_partition(grid, sx, sy, torch.zeros_like(choice))]


def test_hash_scores_are_distinct_deterministic_and_keyed():
    a = hash_scores(5000, key=7)
    assert torch.equal(a, hash_scores(5000, key=7)) and a.unique().numel() == 5000
    assert not torch.equal(a, hash_scores(5000, key=8))
    # roughly uniform over [0, 2**32): each quarter holds about a quarter of the positions
    counts = torch.bincount(a // 2**30, minlength=4)
    assert ((counts > 1100) & (counts < 1400)).all()


def test_hash_normal_is_standard_normal_deterministic_and_keyed():
    z = hash_normal(20000, key=torch.tensor(7))
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    assert torch.equal(z, hash_normal(20000, key=7)) and not torch.equal(z, hash_normal(20000, key=8))
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1) < 0.03
    assert abs(float((z < -1.96).float().mean()) - 0.025) < 0.005  # the lower tail too


def test_cell_argmax_and_partition_per_image_with_ragged_borders():
    # a 3x5 grid, 1x2 cells: one row of two cells in each row, the last column a ragged border
    scores = torch.tensor([[5.0, 1, 1, 2, 9, 0, 3, 4, 4, 9, 1, 1, 2, 2, 9], [0.0] * 15])
    choice = cell_argmax(scores, (3, 5), sx=2, sy=1)
    assert choice.tolist() == [[[0, 1], [1, 0], [0, 0]], [[0, 0]] * 3]  # ties go to the first
    src, dst = cell_partition((3, 5), 2, 1, choice)
    assert dst.tolist() == [[0, 3, 6, 7, 10, 12], [0, 2, 5, 7, 10, 12]]
    assert src.tolist() == [[1, 2, 4, 5, 8, 9, 11, 13, 14], [1, 3, 4, 6, 8, 9, 11, 13, 14]]
    for b in range(2):  # one image's choice gives that image's row
        one_src, one_dst = cell_partition((3, 5), 2, 1, choice[b])
        assert torch.equal(one_src, src[b]) and torch.equal(one_dst, dst[b])
    with pytest.raises(ValueError, match="one entry per 1x2 cell of the 3x5 grid"):
        cell_partition((3, 5), 2, 1, choice[:, :2])


def test_copy_back_pruning_gathers_and_copies_partners_back():
    # sources 0, 1, 2 against destinations 3, 4: 0 -> 4 (0.9) and 2 -> 3 (0.8) are the strongest edges
    scores = torch.tensor([[[0.1, 0.9], [0.3, 0.2], [0.8, 0.0]]])
    sel = bipartite_merge(scores, torch.tensor([[0, 1, 2]]), torch.tensor([[3, 4]]), 2, 5, drop_sources=True, copy_back=True)
    x = torch.arange(5.0)[None, :, None] * 10
    assert sel.gather_only and sel.index.tolist() == [[1, 3, 4]] and sel.apply(x)[0, :, 0].tolist() == [10, 30, 40]
    assert sel.unmerge(sel.apply(x) + 1)[0, :, 0].tolist() == [41, 11, 31, 31, 41]
    assert sel.weights().tolist() == [[0, 1, 0, 1, 1]]  # pruned tokens feed nothing
    torch.testing.assert_close(sel.dense() @ x, sel.apply(x))
    assert sel.sizes(torch.ones(1, 5, 1))[0, :, 0].tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="copy_back .* needs drop_sources=True"):
        bipartite_merge(scores, torch.tensor([[0, 1, 2]]), torch.tensor([[3, 4]]), 2, 5, copy_back=True)


def test_max_min_subset_matches_the_naive_reference():
    import reference
    from tokenreduce.core import max_min_subset

    x = torch.randn(3, 20, 5, generator=torch.Generator().manual_seed(4))
    for k in (1, 4, 20):
        got = max_min_subset(x, k).sort(dim=1).values
        assert [g.tolist() for g in got] == [reference.divprune_select(row, k) for row in x]


def test_grid_pool_averages_windows_and_cuts_edges():
    from tokenreduce.core import grid_pool

    x = torch.arange(15.0).view(1, 15, 1)  # a 3 x 5 grid
    pooled = grid_pool(1, (3, 5), 2).apply(x)[0, :, 0]
    assert pooled.tolist() == [(0 + 1 + 5 + 6) / 4, (2 + 3 + 7 + 8) / 4, (4 + 9) / 2, (10 + 11) / 2, (12 + 13) / 2, 14.0]


def test_nearest_target_merge_adds_the_mean_of_the_assigned_tokens():
    from tokenreduce.core import nearest_target_merge
    from tokenreduce.core.selection import Selection

    metric = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.8, 0.2], [0.1, 0.9]]])
    slot, coeff = nearest_target_merge(metric, torch.tensor([0, 2]))
    assert slot.tolist() == [[0, 0, 1, 0, 1]]
    x = torch.tensor([[[1.0], [2.0], [10.0], [4.0], [20.0]]])
    out = Selection(slot, torch.tensor([[0, 2]]), coeff).apply(x)
    assert out[0, :, 0].tolist() == [1.0 + (2.0 + 4.0) / 2, 10.0 + 20.0]


def test_compact_cuts_spans_and_repads():
    from tokenreduce.core.sequence import SpanKeep, compact, image_spans

    # row 0: [pad, t, I, I, I, t]; row 1: [t, t, I, I, I, t]; each image keeps 1 token (its 3rd)
    placeholder = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    assert image_spans(placeholder) == [(0, 2, 3), (1, 2, 3)]
    spans = [SpanKeep(row, start, n, 1, torch.tensor([2])) for row, start, n in image_spans(placeholder)]
    c = compact(mask, spans, reindex=False)
    assert c.embed_index.tolist() == [[0, 1, 2, 5], [0, 1, 2, 5]]
    assert c.position_index.tolist() == [[0, 1, 4, 5], [0, 1, 4, 5]]
    assert c.mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]] and c.shift.tolist() == [2, 2]
    positions = torch.arange(6).expand(2, -1)
    assert c.positions(positions).tolist() == [[0, 1, 4, 5], [0, 1, 4, 5]]
    r = compact(mask, spans, reindex=True)
    assert r.positions(positions).tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    grown = torch.ones(2, 7, dtype=torch.long)
    assert r.decode_mask(grown).shape == (2, 5) and r.decode_positions(torch.tensor([[6], [6]])).tolist() == [[4], [4]]
