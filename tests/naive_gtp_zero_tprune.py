"""Naive, independent re-implementations of GTP-ViT and Zero-TPrune, one sample at a time, written from
the spec (``vit-methods.md`` sections 10 and 11) and the papers. They share no code with tokenreduce:
Python loops over tokens and heads, a hand-written eager attention, plain lists for graphs and scores."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# ----------------------------------------------------------------------------------------------------
# A timm pre-norm ViT written out for one sample.


def attend(attn, h: Tensor, bias: list[float] | None, sparsity: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """A timm ``Attention`` on one sample ``h [N, C]``, logits plus ``bias`` (one value per key), and
    GTP's sparsity: per head, entries below the k-th smallest (k = int(N*N*(1 - sparsity))) set to 0.
    Returns ``(output [N, C], keys [H, N, d], probs [H, N, N])``."""
    n = h.shape[0]
    heads, d = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(h).reshape(n, 3, heads, d).permute(1, 2, 0, 3)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q @ k.transpose(-1, -2)) * attn.scale
    if bias is not None:
        logits = logits + torch.tensor(bias)[None, None, :]
    probs = logits.softmax(dim=-1)
    if sparsity < 1:
        count = int(n * n * (1 - sparsity))
        if count > 0:
            probs = probs.clone()
            for hh in range(heads):
                values = sorted(probs[hh].flatten().tolist())
                threshold = values[count - 1]
                probs[hh][probs[hh] < threshold] = 0.0
    out = (probs @ v).transpose(0, 1).reshape(n, heads * d)
    return attn.proj(attn.norm(out)), k, probs


def head_of(model, t: Tensor, weights: list[float]) -> Tensor:
    """The model's classifier output for one final token sequence ``t [N, C]`` (after the final norm);
    average pooling weighted by ``weights``."""
    p = model.num_prefix_tokens
    if model.global_pool == "avg":
        total = sum(weights[p:])
        pooled = sum(t[i] * weights[i] for i in range(p, t.shape[0])) / total
        return model.head(model.fc_norm(pooled))
    return model.forward_head(t[None])[0]


# ----------------------------------------------------------------------------------------------------
# GTP-ViT


def gtp_graph(patches: Tensor, rows: int, cols: int, neighbours: int, kind: str) -> list[list[float]]:
    """The normalised graph among the patch tokens ``[M, C]`` entering block 0."""
    m = patches.shape[0]
    adj = [[0.0] * m for _ in range(m)]
    if kind in ("spatial", "mixed"):
        for i in range(m):
            for j in range(m):
                if i != j and abs(i // cols - j // cols) <= 1 and abs(i % cols - j % cols) <= 1:
                    adj[i][j] = 1.0
    if kind in ("semantic", "mixed"):
        unit = [u / u.norm() for u in patches.float()]
        for i in range(m):
            sims = [float(unit[i] @ unit[j]) for j in range(m)]
            threshold = sorted(sims, reverse=True)[neighbours]  # the (neighbours+1)-th largest, itself counted
            for j in range(m):
                if j != i and sims[j] >= threshold:
                    adj[i][j] = 1.0
    degree = [sum(row) for row in adj]
    return [[adj[i][j] / math.sqrt(degree[i] * degree[j]) if adj[i][j] else 0.0 for j in range(m)] for i in range(m)]


def gtp_propagate(
    t: Tensor, scales: list[float], graph: list[list[float]], probs: Tensor, num_prop: int, alpha: float, prefix: int
):
    """One GTP step on one sample: rank = max_h diag * max_h received over the non-prefix tokens; the
    num_prop lowest propagate into the kept ones over the graph. Returns (tokens, scales, graph)."""
    n = t.shape[0]
    heads = probs.shape[0]
    rank = []
    for i in range(prefix, n):
        diag = max(float(probs[h, i, i]) for h in range(heads))
        received = max(float(probs[h, :, i].sum()) for h in range(heads))
        rank.append(diag * received)
    order = sorted(range(n - prefix), key=lambda j: -rank[j])  # stable: ties keep position order
    kept, prop = order[: n - prefix - num_prop], order[n - prefix - num_prop :]
    rows = [t[i] for i in range(prefix)]
    new_scales = [scales[i] for i in range(prefix)]
    for a in kept:
        x = t[prefix + a].clone()
        s = scales[prefix + a]
        for b in prop:
            x = x + alpha * graph[a][b] * t[prefix + b]
            s = s + alpha * graph[a][b] * scales[prefix + b]
        rows.append(x)
        new_scales.append(s)
    new_graph = [[graph[a][b] for b in kept] for a in kept]
    return torch.stack(rows), new_scales, new_graph


def gtp_forward(
    model,
    images: Tensor,
    num_prop: list[int],
    sparsity: float,
    alpha: float,
    neighbours: int = 8,
    token_scale: bool = True,
    kind: str = "mixed",
    grid: tuple[int, int] | None = None,
) -> Tensor:
    """A pre-norm timm ViT with GTP-ViT in every block, run sample by sample."""
    outs = []
    p = model.num_prefix_tokens
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for t in tokens:
            m = t.shape[0] - p
            rows, cols = grid if grid is not None else (math.isqrt(m), math.isqrt(m))
            graph = gtp_graph(t[p:], rows, cols, neighbours, kind)
            scales = [1.0] * t.shape[0]
            for layer, blk in enumerate(model.blocks):
                bias = [math.log(s) for s in scales] if token_scale else None
                out, _, probs = attend(blk.attn, blk.norm1(t), bias, sparsity)
                t = t + blk.ls1(out)
                if num_prop[layer]:
                    t, scales, graph = gtp_propagate(t, scales, graph, probs, num_prop[layer], alpha, p)
                t = t + blk.ls2(blk.mlp(blk.norm2(t)))
            outs.append(head_of(model, model.norm(t), scales))
    return torch.stack(outs)


# ----------------------------------------------------------------------------------------------------
# Zero-TPrune


def wpr(probs: Tensor, alive: list[int], iterations: int, cls_first: bool) -> list[dict[int, float]]:
    """Weighted PageRank per head on the graph of the ``alive`` tokens: rows renormalised over the alive
    keys, s_i <- sum_j A[j, i] s_j; the first token (the class token) starts at sqrt(len(alive)) times the
    others when ``cls_first``. One ``{token: score}`` per head, scores summing to 1."""
    out = []
    for h in range(probs.shape[0]):
        a = probs[h].double().tolist()
        row_sum = {j: sum(a[j][i] for i in alive) for j in alive}
        s = {i: 1.0 for i in alive}
        if cls_first and 0 in s:
            s[0] = math.sqrt(len(alive))
        total = sum(s.values())
        s = {i: v / total for i, v in s.items()}
        for _ in range(iterations):
            s = {i: sum(a[j][i] / row_sum[j] * s[j] for j in alive) for i in alive}
        out.append(s)
    return out


def aggregate(per_head: list[dict[int, float]], low_high: tuple[float, float] | None) -> dict[int, float]:
    """EIR over the heads whose variance (scores scaled to mean 1) lies in ``low_high``; all if none."""
    chosen = list(range(len(per_head)))
    if low_high is not None:
        inside = []
        for h, s in enumerate(per_head):
            mean = sum(s.values()) / len(s)
            var = sum((v / mean - 1) ** 2 for v in s.values()) / len(s)
            if low_high[0] <= var <= low_high[1]:
                inside.append(h)
        chosen = inside or chosen
    tokens = per_head[0].keys()
    return {i: math.sqrt(sum(per_head[h][i] ** 2 for h in chosen) / len(chosen)) for i in tokens}


def zero_tprune_step(
    t: Tensor,
    keys: Tensor,
    probs: Tensor,
    prefix: int,
    kept: int,
    r: int,
    iterations: int,
    uniform: bool = False,
    variance: tuple[float, float] | None = (0.01, 0.7),
) -> Tensor:
    """One pruning layer on one sample: I' (one WPR step) -> S (Sequential-U, cosine of head-mean keys,
    drop the r most redundant of the less important half) -> I (WPR on the rest, keep the top ``kept``)."""
    n = t.shape[0]
    cls_first = prefix > 0 and not uniform
    everyone = list(range(n))
    dropped: set[int] = set()
    if r:
        pre = aggregate(wpr(probs, everyone, 1, cls_first), variance)
        patches = sorted(range(prefix, n), key=lambda i: pre[i])  # stable: ties by position
        half_a, half_b = patches[: (n - prefix) // 2], patches[(n - prefix) // 2 :]
        metric = keys.mean(0)
        unit = [u / u.norm() for u in metric]
        best = {a: max(float(unit[a] @ unit[b]) for b in half_b) for a in half_a}
        dropped = set(sorted(half_a, key=lambda a: -best[a])[:r])
    alive = [i for i in everyone if i not in dropped]
    score = aggregate(wpr(probs, alive, iterations, cls_first), variance)
    candidates = [i for i in range(prefix, n) if i not in dropped]
    top = sorted(sorted(candidates, key=lambda i: -score[i])[:kept])
    return torch.stack([t[i] for i in range(prefix)] + [t[i] for i in top])


def vit_forward_end(model, images: Tensor, step) -> Tensor:
    """A pre-norm timm ViT sample by sample; ``step(layer, t, keys, probs)`` after each whole block, with
    the keys and attention that block computed, returns the new tokens."""
    outs = []
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for t in tokens:
            for layer, blk in enumerate(model.blocks):
                out, k, probs = attend(blk.attn, blk.norm1(t), None)
                t = t + blk.ls1(out)
                t = t + blk.ls2(blk.mlp(blk.norm2(t)))
                t = step(layer, t, k, probs)
            outs.append(head_of(model, model.norm(t), [1.0] * t.shape[0]))
    return torch.stack(outs)
