"""Naive virtual token unmerging (DyMU), written from the paper's description with Python loops: every
attention layer of a Llama LLM copies each merged token to every place it covers, attends over the
full prompt with each place's own RoPE position, and averages each merged token's outputs."""

from __future__ import annotations

import math

import torch


def _rope(x: torch.Tensor, position: int, theta: float) -> torch.Tensor:
    """Llama's rotary embedding of one head vector ``x [d]`` at ``position``."""
    d = x.shape[-1]
    angles = [position / theta ** (2 * i / d) for i in range(d // 2)]
    cos = torch.tensor([math.cos(a) for a in angles] * 2, dtype=x.dtype)
    sin = torch.tensor([math.sin(a) for a in angles] * 2, dtype=x.dtype)
    rotated = torch.cat([-x[d // 2 :], x[: d // 2]])
    return x * cos + rotated * sin


def vtu_logits(model, embeds: torch.Tensor, place: list[int], positions: list[int]) -> torch.Tensor:
    """Logits ``[L', V]`` of a LLaVA model (Llama LLM) reading the merged prompt ``embeds [L', D]`` (one
    row, no padding) whose full prompt has ``len(place)`` places: ``place[p]`` is the merged token at
    place ``p``, ``positions[p]`` its position id."""
    text = model.model.language_model
    config = text.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    d = config.hidden_size // heads
    theta = float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
    h = embeds.clone()
    with torch.no_grad():
        for layer in text.layers:
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q, k, v = [], [], []
            for p, s in enumerate(place):
                qp = attn.q_proj(x[s]).view(heads, d)
                kp = attn.k_proj(x[s]).view(kv_heads, d)
                q.append(torch.stack([_rope(qp[i], positions[p], theta) for i in range(heads)]))
                k.append(torch.stack([_rope(kp[i], positions[p], theta) for i in range(kv_heads)]))
                v.append(attn.v_proj(x[s]).view(kv_heads, d))
            out = torch.zeros(len(place), heads, d)
            for p in range(len(place)):
                for i in range(heads):
                    g = i // (heads // kv_heads)
                    scores = torch.stack([q[p][i] @ k[j][g] / math.sqrt(d) for j in range(p + 1)])
                    weights = torch.softmax(scores, dim=0)
                    out[p, i] = sum(weights[j] * v[j][g] for j in range(p + 1))
            merged = torch.zeros(h.shape[0], heads * d)
            for s in range(h.shape[0]):
                mine = [p for p in range(len(place)) if place[p] == s]
                merged[s] = sum(out[p].flatten() for p in mine) / len(mine)
            h = h + attn.o_proj(merged)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return model.lm_head(text.norm(h))
