"""AIM written from the spec with Python loops, sharing no code with the method: ToMe merge rounds on
one image's tokens, and PageRank scores of one prompt (no padding) at one decoder layer."""

from __future__ import annotations

import math

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def tome_round(x: list[torch.Tensor], r: int) -> list[torch.Tensor]:
    """Even positions are sources, odd ones destinations; each source's best destination by cosine;
    the ``r`` sources with the most similar best match are averaged into it (a plain mean with every
    source that chose it). Output: the other sources by decreasing best similarity, then the destinations."""
    a, b = x[0::2], x[1::2]
    best = []
    for s in a:
        sims = [float(torch.nn.functional.cosine_similarity(s, d, dim=0)) for d in b]
        best.append((max(sims), sims.index(max(sims))))
    order = sorted(range(len(a)), key=lambda i: -best[i][0])
    merged, kept = order[:r], order[r:]
    out_b = []
    for j, d in enumerate(b):
        group = [d] + [a[i] for i in merged if best[i][1] == j]
        out_b.append(torch.stack(group).mean(0))
    return [a[i] for i in kept] + out_b


def pagerank_scores(
    attn, hidden: torch.Tensor, cos, sin, temperature: float, iterations: int, masked: frozenset[int] = frozenset()
) -> list[float]:
    """``hidden [L, D]`` as the attention module of a Llama layer reads it (after the input norm) with
    its rotary tables: ``M = softmax(q k^T * scale / temperature)`` over the causal row per head,
    ``s`` uniform, ``iterations`` times ``s <- s M``, then ``sqrt(mean over heads of s^2)`` per token.
    The reference's masking: no row sees the ``masked`` positions (their own rows included; a row left
    with nothing sees itself), ``s`` still starts uniform over all ``L``."""
    with torch.no_grad():
        length, hd = hidden.shape[0], attn.head_dim
        q = attn.q_proj(hidden[None]).view(1, length, -1, hd).transpose(1, 2)
        k = attn.k_proj(hidden[None]).view(1, length, -1, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        q, k = q[0].double(), k[0].double()
    heads, kv_heads = q.shape[0], k.shape[0]
    total = [0.0] * length
    for h in range(heads):
        kh = k[h // (heads // kv_heads)]
        rows = []
        for i in range(length):
            seen = [j for j in range(i + 1) if j not in masked] or [i]
            logits = {j: float(q[h, i] @ kh[j]) / math.sqrt(hd) / temperature for j in seen}
            top = max(logits.values())
            weights = {j: math.exp(v - top) for j, v in logits.items()}
            rows.append([weights[j] / sum(weights.values()) if j in weights else 0.0 for j in range(length)])
        s = [1 / length] * length
        for _ in range(iterations):
            s = [sum(s[i] * rows[i][j] for i in range(length)) for j in range(length)]
        for j in range(length):
            total[j] += s[j] ** 2 / heads
    return [math.sqrt(t) for t in total]
