"""A slow reference for reduction inside an LLM: the unpatched LLaVA's LLM run layer by layer in a
Python loop on one unpadded prompt, a test's hand-written reduction applied to the hidden states and
position ids between layers, then greedy decoding with a cache per layer. Shares no code with
tokenreduce: each layer is called with its own explicit causal mask and rotary tables."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor

from conftest import IMAGE_TOKEN

# reduce(layer, hidden [L, D], positions [L], inputs) -> (hidden, positions), called before every layer;
# inputs[i] = (hidden [L_i, D], positions [L_i]) that layer i < layer read
Reduce = Callable[[int, Tensor, Tensor, list], tuple[Tensor, Tensor]]


def prompt_embeds(base, kw: dict) -> Tensor:
    """``[L, D]``: the LLM input of the one prompt of ``kw`` (image features in the placeholders)."""
    ids = kw["input_ids"][0]
    with torch.no_grad():
        embeds = base.model.get_input_embeddings()(ids).clone()
        features = base.model.get_image_features(pixel_values=kw["pixel_values"]).pooler_output
        embeds[ids == IMAGE_TOKEN] = torch.cat(list(features)).to(embeds.dtype)
    return embeds


def queries_keys(base, layer: int, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, float]:
    """Layer ``layer``'s queries and keys ``[H, L, D]`` (rotary applied, one key per query head) on
    its input ``hidden [L, D]`` at ``positions [L]``, and its softmax scale."""
    text = base.model.language_model
    block = text.layers[layer]
    attention = block.self_attn
    x = block.input_layernorm(hidden[None])
    cos, sin = text.rotary_emb(x, positions[None])
    q = attention.q_proj(x).view(1, x.shape[1], -1, attention.head_dim).transpose(1, 2)
    k = attention.k_proj(x).view(1, x.shape[1], -1, attention.head_dim).transpose(1, 2)
    q, k = sys.modules[type(block).__module__].apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return q[0], k[0], attention.scaling


def _mask(queries: int, keys: int) -> Tensor:
    """An additive causal mask ``[1, 1, q, k]`` whose queries are the last ``q`` of ``k`` tokens."""
    allowed = torch.ones(queries, keys, dtype=torch.bool).tril(diagonal=keys - queries)
    return torch.zeros(1, 1, queries, keys).masked_fill(~allowed, torch.finfo(torch.float32).min)


def generate(base, kw: dict, reduce: Reduce, tokens: int) -> tuple[list[int], Tensor]:
    """Greedy ``tokens`` after the one prompt of ``kw`` with ``reduce`` between prefill layers, and the
    prompt's last-token logits. Decode positions continue from each layer's last prefill position."""
    from transformers import DynamicCache

    text = base.model.language_model
    cache = DynamicCache(config=text.config)
    hidden = prompt_embeds(base, kw)
    positions = torch.arange(hidden.shape[0])
    inputs, last = [], []
    with torch.no_grad():
        for i, layer in enumerate(text.layers):
            hidden, positions = reduce(i, hidden, positions, inputs)
            inputs.append((hidden, positions))
            last.append(int(positions[-1]))
            cos, sin = text.rotary_emb(hidden[None], positions[None])
            hidden = layer(
                hidden[None],
                attention_mask=_mask(hidden.shape[0], hidden.shape[0]),
                position_ids=positions[None],
                cache=cache,
                use_cache=True,
                position_embeddings=(cos, sin),
            )[0]
        logits = base.lm_head(text.norm(hidden[-1]))
        out, step = [], logits
        for t in range(tokens):
            token = int(step.argmax())
            out.append(token)
            h = base.model.get_input_embeddings()(torch.tensor([[token]]))
            for i, layer in enumerate(text.layers):
                position = torch.tensor([[last[i] + 1 + t]])
                cos, sin = text.rotary_emb(h, position)
                keys = cache.get_seq_length(i) + 1
                h = layer(
                    h,
                    attention_mask=_mask(1, keys),
                    position_ids=position,
                    cache=cache,
                    use_cache=True,
                    position_embeddings=(cos, sin),
                )
            step = base.lm_head(text.norm(h[0, -1]))
    return out, logits
