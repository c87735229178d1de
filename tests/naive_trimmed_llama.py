"""Naive oracles for Trimmed Llama, written from the paper's rule with Python loops and the unpatched
model's own parts, sharing no code with tokenreduce: which image features a prompt keeps, and what the
unpatched model generates when its cross-attention layers read only those features."""

from __future__ import annotations

import math

import torch
from transformers import DynamicCache
from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask


def first_cross_inputs(model, inputs: dict) -> dict:
    """The keyword inputs of the unpatched model's first cross-attention layer on a prompt."""
    text = model.model.language_model
    layer = text.layers[min(text.cross_attention_layers)]
    seen = {}

    def grab(module, args, kwargs):
        seen.update(kwargs, hidden_states=args[0] if args else kwargs["hidden_states"])

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen


def kept_features(model, inputs: dict, keep_ratio: float) -> list[list[int]]:
    """Per row, the features the paper's rule keeps: at the first cross-attention layer each head scores
    feature n by the sum over the text tokens that read the image of their softmax attention to it; each
    head keeps its round(keep_ratio * N) best (earlier feature first on ties); the union is kept."""
    seen = first_cross_inputs(model, inputs)
    text = model.model.language_model
    layer = text.layers[min(text.cross_attention_layers)]
    attn = layer.cross_attn
    hidden, mask, rows = seen["hidden_states"], seen["cross_attention_mask"], seen["full_text_row_masked_out_mask"]
    b, t, _ = hidden.shape
    states = seen["cross_attention_states"].reshape(b, -1, hidden.shape[-1])
    n = states.shape[1]
    heads, dim = attn.num_heads, attn.head_dim
    group = heads // attn.num_key_value_heads
    k_count = min(n, max(1, round(keep_ratio * n)))
    out = []
    with torch.no_grad():
        x = layer.input_layernorm(hidden)
        for row in range(b):
            chosen = set()
            keys = attn.k_proj(states[row])  # [N, H_kv * dim]
            for h in range(heads):
                kv = h // group
                key = [attn.k_norm(keys[j, kv * dim : (kv + 1) * dim]).double() for j in range(n)]
                score = [0.0] * n
                for tok in range(t):
                    if rows[row, 0, tok, 0] == 0:
                        continue  # the token reads no image
                    query = attn.q_norm(attn.q_proj(x[row, tok])[h * dim : (h + 1) * dim]).double()
                    logits = [float(query @ key[j]) * attn.scaling + float(mask[row, 0, tok, j]) for j in range(n)]
                    top = max(logits)
                    weights = [math.exp(v - top) for v in logits]
                    total = sum(weights)
                    for j in range(n):
                        score[j] += weights[j] / total
                chosen.update(sorted(range(n), key=lambda j: (-score[j], j))[:k_count])
            out.append(sorted(chosen))
    return out


def generate_trimmed(model, inputs: dict, kept: list[int], tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt logits, greedy tokens)`` of the unpatched model on a one-row, unpadded prompt whose
    cross-attention layers read only the features ``kept``: the features cut before its text model,
    their mask built by the model's own function from the per-feature mask cut to them."""
    base = model.model
    text = base.language_model
    with torch.no_grad():
        vision = base.vision_model(
            pixel_values=inputs["pixel_values"],
            aspect_ratio_ids=inputs["aspect_ratio_ids"],
            aspect_ratio_mask=inputs["aspect_ratio_mask"],
        ).last_hidden_state
        features = base.multi_modal_projector(vision).reshape(1, -1, text.config.hidden_size)[:, kept]
        per_feature = inputs["cross_attention_mask"].repeat_interleave(base.vision_model.num_patches, dim=3)
        per_feature = per_feature.flatten(2)[:, :, kept][:, :, None, :]  # [1, T, 1, K]: one "tile" per feature
        ids, cache, out, prompt = inputs["input_ids"], DynamicCache(config=text.config), [], None
        for step in range(tokens):
            rows = per_feature if step == 0 else per_feature[:, -1:]
            mask, full_rows = _prepare_cross_attention_mask(rows, num_vision_tokens=1, dtype=model.dtype)
            hidden = text(
                input_ids=ids if step == 0 else ids[:, -1:],
                cross_attention_states=features if step == 0 else None,
                cross_attention_mask=mask,
                full_text_row_masked_out_mask=full_rows,
                cache=cache,
                use_cache=True,
            ).last_hidden_state
            logits = model.lm_head(hidden)
            prompt = logits if step == 0 else prompt
            out.append(logits[:, -1].argmax(-1, keepdim=True))
            ids = torch.cat([ids, out[-1]], dim=1)
            per_feature = torch.cat([per_feature, per_feature[:, -1:]], dim=1)
    return prompt, torch.cat(out, dim=1)
