"""Naive oracles for MCTF, PPT and DiffRate, written from the spec (``/work/shared/specs/vit-methods.md``
sections 7-9): Python loops over tokens, one sample at a time, a hand-written timm attention and block,
and no code shared with tokenreduce."""

from __future__ import annotations

import math

import torch
from torch import Tensor

import reference


def attention_parts(attn, t: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A timm ``Attention`` on one sample ``t [N, C]``: ``(q, k, v, probs)``, ``[H, N, D]`` and ``[H, N, N]``;
    ``size [N]`` adds ``log(size)`` to the logits (proportional attention) when given."""
    n = t.shape[0]
    q, k, v = attn.qkv(t).reshape(n, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q @ k.transpose(-1, -2)) * attn.scale
    if size is not None:
        logits = logits + size.log()
    return q, k, v, logits.softmax(dim=-1)


def finish_attention(attn, probs: Tensor, v: Tensor) -> Tensor:
    """The rest of a timm ``Attention`` after its softmax, for one sample."""
    out = (probs @ v).transpose(0, 1).reshape(probs.shape[1], -1)
    return attn.proj(attn.norm(out))


def head(model, t: Tensor, size: Tensor) -> Tensor:
    t = model.norm(t)
    if getattr(model, "head_dist", None) is not None:  # distilled DeiT: mean of the two heads
        return (model.head(t[0]) + model.head_dist(t[1])) / 2
    if model.global_pool == "avg":
        p = model.num_prefix_tokens
        pooled = sum(t[i] * size[i] for i in range(p, t.shape[0])) / sum(size[i] for i in range(p, t.shape[0]))
    else:
        pooled = t[0]
    return model.head(model.fc_norm(pooled))


def vit_forward(model, images: Tensor, step, prop_attn: bool = True) -> Tensor:
    """A pre-norm timm ViT run sample by sample; ``step(layer, t, q, k, v, probs, size)`` after each
    attention residual returns the new ``(t, size)``."""
    outs = []
    with torch.no_grad():
        for t in model.norm_pre(model._pos_embed(model.patch_embed(images))):
            size = torch.ones(t.shape[0])
            for layer, blk in enumerate(model.blocks):
                q, k, v, probs = attention_parts(blk.attn, blk.norm1(t), size if prop_attn else None)
                t = t + blk.ls1(finish_attention(blk.attn, probs, v))
                t, size = step(layer, t, q, k, v, probs, size)
                t = t + blk.ls2(blk.mlp(blk.norm2(t)))
            outs.append(head(model, t, size))
    return torch.stack(outs)


# -- MCTF -----------------------------------------------------------------------------------------


def mctf_count(n: int, r: float, prefix: int) -> int:
    """Tokens an active MCTF block merges (spec §7 step 2)."""
    r = int((n - prefix) * r) if r < 1 else int(r)
    if n - r < 10:
        r = n - 10
    return max(0, min(r, (n - prefix) // 2))


def mctf_groups(x, probs, size, r, prefix, tau=(1.0, 20.0, 40.0), bidirectional=True) -> list[list[int]]:
    """MCTF's merge of one sample (spec §7 steps 3-4): the groups of input tokens forming each output, in
    output order. ``x [N, C]`` hidden states, ``probs [H, N, N]`` attention, ``size [N]``."""
    n = x.shape[0]
    tau_sim, tau_info, tau_size = tau
    received = [float(probs[:, :, j].mean()) for j in range(n)]
    inv_a = [1 / a for a in received]
    inv_s = [1 / float(s) for s in size]
    w = [v / max(inv_a) for v in inv_a]
    s = [v / max(inv_s) for v in inv_s]
    unit = [xi / xi.norm() for xi in x.double()]

    def score(i, j):
        if i < prefix or j < prefix:
            return -math.inf
        value = 1.0
        if tau_sim:
            value *= ((float(unit[i] @ unit[j]) + 1) / 2) ** (1 / tau_sim)
        if tau_info:
            value *= (w[i] * w[j]) ** (1 / tau_info)
        if tau_size:
            value *= (s[i] * s[j]) ** (1 / tau_size)
        return value

    def best_of(candidates, value):  # (highest value, its candidate), the first one on ties
        values = [value(c) for c in candidates]
        k = max(range(len(candidates)), key=lambda t: values[t])
        return values[k], candidates[k]

    a_side, b_side = list(range(0, n, 2)), list(range(1, n, 2))
    r1 = r // 2 if bidirectional else r
    best = {i: best_of(b_side, lambda j, i=i: score(i, j)) for i in a_side}
    ranked = sorted(a_side, key=lambda i: -best[i][0])
    sources, kept_a = ranked[:r1], ranked[r1:]
    if prefix:
        kept_a = sorted(kept_a)
    group = {j: [j] for j in b_side}
    for i in sources:
        group[best[i][1]].append(i)
    a_group = {i: [i] for i in kept_a}
    kept_b = [j for j in b_side if j >= prefix]
    if bidirectional:
        back = {j: best_of(kept_a, lambda i, j=j: score(i, j)) for j in kept_b}
        kept_b = sorted(kept_b, key=lambda j: -back[j][0])
        for j in kept_b[: r - r1]:
            a_group[back[j][1]] += group[j]
        kept_b = kept_b[r - r1 :]
    out = [[t] for t in range(prefix)]
    out += [a_group[i] for i in kept_a if i >= prefix]
    out += [group[j] for j in kept_b]
    return out


def pool_groups(x: Tensor, size: Tensor, groups: list[list[int]], weight: list[float]) -> tuple[Tensor, Tensor]:
    rows, sizes = [], []
    for g in groups:
        rows.append(sum(x[i] * weight[i] for i in g) / sum(weight[i] for i in g))
        sizes.append(sum(size[i] for i in g))
    return torch.stack(rows), torch.stack(sizes)


def merged_attention(probs: Tensor, groups: list[list[int]], weight: list[float]) -> Tensor:
    """Attention of the merged tokens: summed over each group of keys, weight-averaged over each group
    of queries."""
    heads = probs.shape[0]
    out = torch.zeros(heads, len(groups), len(groups))
    for a, qg in enumerate(groups):
        row = sum(probs[:, q, :] * weight[q] for q in qg) / sum(weight[q] for q in qg)  # [H, N]
        for b, kg in enumerate(groups):
            out[:, a, b] = sum(row[:, k] for k in kg)
    return out


def mctf_forward(model, images: Tensor, r: float, layers, one_step_ahead: int = 1, pooling: str = "attention", **kw) -> Tensor:
    """A pre-norm timm ViT with MCTF written out block by block (spec §7), sample by sample."""
    prefix = model.num_prefix_tokens
    outs = []

    def weights(probs, size):
        received = [float(probs[:, :, j].mean()) for j in range(probs.shape[-1])]
        return {
            "attention": [received[j] * float(size[j]) for j in range(len(received))],
            "size": [float(s) for s in size],
            "mean": [1.0] * len(received),
        }[pooling]

    with torch.no_grad():
        for t in model.norm_pre(model._pos_embed(model.patch_embed(images))):
            size = torch.ones(t.shape[0])
            for layer, blk in enumerate(model.blocks):
                n = t.shape[0]
                merges = mctf_count(n, r, prefix) if layer in layers else 0
                q, k, v, probs = attention_parts(blk.attn, blk.norm1(t), size)
                if merges and one_step_ahead:
                    groups = mctf_groups(t, probs, size, merges, prefix, **kw)
                    weight = weights(probs, size)
                    t, size = pool_groups(t, size, groups, weight)
                    if one_step_ahead == 1:
                        _, _, v, _ = attention_parts(blk.attn, blk.norm1(t), size)
                        probs = merged_attention(probs, groups, weight)
                    else:
                        _, _, v, probs = attention_parts(blk.attn, blk.norm1(t), size)
                t = t + blk.ls1(finish_attention(blk.attn, probs, v))
                t = t + blk.ls2(blk.mlp(blk.norm2(t)))
                if merges and not one_step_ahead:
                    groups = mctf_groups(t, probs, size, merges, prefix, **kw)
                    t, size = pool_groups(t, size, groups, weights(probs, size))
            outs.append(head(model, t, size))
    return torch.stack(outs)


# -- PPT ----------------------------------------------------------------------------------------------


def ppt_step(t, k, v, probs, size, r: int, threshold: float, prefix: int) -> tuple[Tensor, Tensor, bool]:
    """PPT at one reduction block for one sample (spec §8): returns ``(t, size, pooled)``."""
    n = t.shape[0]
    r = min(r, (n - prefix) // 2)
    raw = {j: float(probs[:, 0, j].sum()) * float(v[:, j, :].reshape(-1).norm()) for j in range(prefix, n)}
    total = sum(raw.values())
    sig = {j: raw[j] / total for j in raw}
    mean = sum(sig.values()) / len(sig)
    variance = sum((s - mean) ** 2 for s in sig.values()) / (len(sig) - 1)
    if variance < threshold:
        x, s = reference.tome_merge(t, k.mean(0), size, r, prefix)
        return x, s, True
    top = sorted(sig, key=lambda j: -sig[j])[: n - prefix - r]
    kept = list(range(prefix)) + top
    return torch.stack([t[i] for i in kept]), torch.stack([size[i] for i in kept]), False


# -- DiffRate -----------------------------------------------------------------------------------------


def diffrate_step(t, probs, size, pruned: int, merged: int, prefix: int, size_weighted: bool = False):
    """DiffRate at one block for one sample (spec §9 steps 2-4): sort by CLS attention, keep ``pruned``,
    merge the kept tokens after the first ``merged`` into their most similar token among those."""
    n = t.shape[0]
    if merged == n:
        return t, size
    cls = {j: float(probs[:, 0, j].mean()) for j in range(prefix, n)}
    order = list(range(prefix)) + sorted(cls, key=lambda j: -cls[j])[: pruned - prefix]
    kept, sources = order[:merged], order[merged:]
    unit = {i: t[i].double() / t[i].double().norm() for i in order}
    group = {d: [] for d in kept}
    for s_ in sources:
        sims = {d: float(unit[s_] @ unit[d]) for d in kept[prefix:]}
        d = max(kept[prefix:], key=lambda c: sims[c])
        group[d].append((s_, sims[d]))
    rows, sizes = [], []
    for d in kept:
        members = [d] + [s_ for s_, _ in group[d]]
        if size_weighted:
            rows.append(sum(t[i] * size[i] for i in members) / sum(size[i] for i in members))
            sizes.append(sum(size[i] for i in members))
        else:
            rows.append(sum(t[i] for i in members) / len(members))
            sizes.append(size[d] + sum(size[s_] * max(sim, 0.0) for s_, sim in group[d]))
    return torch.stack(rows), torch.stack(sizes)
