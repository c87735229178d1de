"""VisionDrop's in-LLM stage written from the spec with Python loops, sharing no code with the method:
one prompt (no padding), positions 0..L-1 (re-indexed), one image whose tokens start at ``start``."""

from __future__ import annotations

import math

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def visual_scores_and_keys(layer, rotary, hidden: torch.Tensor, start: int, n: int) -> tuple[list[float], torch.Tensor]:
    """``hidden [L, D]`` entering a Llama decoder ``layer``: per image token, the attention it receives
    from the image's queries (causal softmax over the whole row, mean over heads, then over the image's
    queries), and the layer's rotated keys ``[H_kv, L, head_dim]``."""
    with torch.no_grad():
        return _visual(layer, rotary, hidden, start, n)


def _visual(layer, rotary, hidden: torch.Tensor, start: int, n: int) -> tuple[list[float], torch.Tensor]:
    attn = layer.self_attn
    length, hd = hidden.shape[0], attn.head_dim
    x = layer.input_layernorm(hidden[None])
    q = attn.q_proj(x).view(1, length, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, length, -1, hd).transpose(1, 2)
    cos, sin = rotary(x, torch.arange(length)[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    q, k = q[0], k[0]
    heads, kv_heads = q.shape[0], k.shape[0]
    scores = [0.0] * n
    for h in range(heads):
        kh = k[h // (heads // kv_heads)]
        for i in range(start, start + n):
            logits = [float(q[h, i] @ kh[j]) / math.sqrt(hd) for j in range(i + 1)]
            top = max(logits)
            total = sum(math.exp(v - top) for v in logits)
            for j in range(start, i + 1):
                scores[j - start] += math.exp(logits[j] - top) / total / (heads * n)
    return scores, k


def dominant_then_contextual(scores: list[float], metric: torch.Tensor, states: torch.Tensor, dominant: int, contextual: int):
    """The ``dominant`` highest-scoring tokens in order, then ``contextual`` merged tokens: every
    ``len(rest) // contextual``-th of the others is a target, each other joins the target whose
    ``metric`` row is most cosine-similar, and a merged token is its target plus the mean of those that
    joined it. Returns ``(indices of the outputs, output states)``."""
    n = len(scores)
    picked = sorted(sorted(range(n), key=lambda i: -scores[i])[:dominant])
    rest = [i for i in range(n) if i not in picked]
    step = max(1, len(rest) // contextual) if contextual else 1
    targets = [rest[t] for t in range(0, len(rest), step)][:contextual]
    joined = {t: [] for t in targets}
    for i in rest:
        if i in targets:
            continue
        sims = [float(torch.nn.functional.cosine_similarity(metric[i], metric[t], dim=0)) for t in targets]
        joined[targets[sims.index(max(sims))]].append(i)
    out = [states[i] for i in picked]
    for t in targets:
        out.append(states[t] + (torch.stack([states[i] for i in joined[t]]).mean(0) if joined[t] else 0))
    return picked + targets, torch.stack(out)
