"""FrameFusion written from the spec with Python loops, sharing no code with tokenreduce: the merge of
one video's tokens, the prune count, and a whole prefill and greedy decode of an unpatched eager LLaVA
with those merges and prunes applied by hand."""

from __future__ import annotations

import math

import torch


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a * b).sum() / (a.norm() * b.norm()))


def merge_groups(x: torch.Tensor, frames: int, patches: int, threshold: float, cost: float) -> list[list[int]]:
    """``x [N, D]`` frame-major video tokens -> the groups ``[head, merged...]`` (heads in order): a token
    of frame t > 0 at least ``threshold`` similar to its patch in frame t - 1 merges, unless those are
    ``(1 - cost) * N`` or more: then the ``int((1 - cost) * N)`` most similar merge. A merged token joins
    the last unmerged token before it at its patch."""
    n = x.shape[0]
    similarity = {}
    for t in range(1, frames):
        for p in range(patches):
            i = t * patches + p
            similarity[i] = cosine(x[i], x[i - patches])
    merged = {i for i, s in similarity.items() if s >= threshold}
    if len(merged) / n >= 1 - cost:
        ranked = sorted(similarity, key=lambda i: -similarity[i])
        merged = set(ranked[: min(int((1 - cost) * n), len(ranked))])
    head_of = {}
    for p in range(patches):
        head = None
        for t in range(frames):
            i = t * patches + p
            if i not in merged:
                head = i
            head_of[i] = head
    for i in range(frames * patches, n):
        head_of[i] = i
    groups = {}
    for i in range(n):
        groups.setdefault(head_of[i], []).append(i)
    return [groups[h] for h in sorted(groups)]


def prune_count(inputs: int, merged: int, cost: float, num_layers: int) -> int:
    """The reference's pruning ratio for one merge layer of merged share r: keep round(left * (1 - p))."""
    s = 1 - merged / inputs
    left = inputs - merged
    p = 1 - (num_layers * cost - s) / ((num_layers - 1) * s)
    p = max(p, 0.0)
    return min(left, max(1, round(left * (1 - p))))


def top_in_order(scores: list[float], count: int) -> list[int]:
    return sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:count])


def llava_prefill_and_decode(base, input_ids, pixel_values, image_token, frames, patches, config, new_tokens):
    """An unpatched eager LLaVA (batch 1, no padding) run layer by layer: at the input of
    ``config["layer"]`` the video span's tokens merge (group means, at the head's position), at the input
    of the next layer they are pruned by the last token's attention at ``layer`` (mean over heads);
    kept tokens keep their position ids; then greedy decoding with a cache. Returns the last prompt
    logits, the kept tokens' indices in the span and the generated tokens."""
    from transformers import DynamicCache

    layer, cost, threshold = config["layer"], config["cost"], config["similarity_lower_bound"]
    num_layers = config.get("num_layers", 28)
    lm = base.model.language_model
    with torch.no_grad():
        h = base.get_input_embeddings()(input_ids).clone()
        feats = base.model.get_image_features(pixel_values=pixel_values).pooler_output[0]
        where = (input_ids[0] == image_token).nonzero().flatten().tolist()
        start, n = where[0], len(where)
        h[0, start : start + n] = feats
        positions = list(range(input_ids.shape[1]))
        span = list(range(n))  # span index (at the LLM input) of each current span token
        captured = {}
        hook = lm.layers[layer].self_attn.register_forward_hook(lambda m, a, out: captured.update(probs=out[1]))
        cache = DynamicCache(config=lm.config)
        try:
            for i, block in enumerate(lm.layers):
                if i == layer:
                    groups = merge_groups(h[0, start : start + n], frames, patches, threshold, cost)
                    merged = torch.stack([h[0, start + torch.tensor(g)].float().mean(0) for g in groups]).to(h.dtype)
                    h = torch.cat([h[:, :start], merged[None], h[:, start + n :]], dim=1)
                    positions = positions[:start] + [start + g[0] for g in groups] + positions[start + n :]
                    span = [g[0] for g in groups]
                if i == layer + 1:
                    row = captured["probs"][0].mean(0)[-1]
                    scores = [float(row[start + j]) for j in range(len(span))]
                    keep = top_in_order(scores, prune_count(n, n - len(span), cost, num_layers))
                    rows = list(range(start)) + [start + j for j in keep] + list(range(start + len(span), h.shape[1]))
                    h, positions, span = h[:, rows], [positions[r] for r in rows], [span[j] for j in keep]
                length = h.shape[1]
                mask = torch.full((length, length), torch.finfo(h.dtype).min).triu(1)[None, None]
                pos = torch.tensor([positions])
                rotary = lm.rotary_emb(h, pos)
                h = block(h, attention_mask=mask, position_ids=pos, position_embeddings=rotary, cache=cache, use_cache=True)
            logits = base.lm_head(lm.norm(h))[0, -1]
            out, token, next_position = [], logits.argmax(), input_ids.shape[1]
            for _ in range(new_tokens):
                out.append(int(token))
                x = base.get_input_embeddings()(token.view(1, 1))
                pos = torch.tensor([[next_position]])
                for block in lm.layers:
                    rotary = lm.rotary_emb(x, pos)
                    x = block(x, attention_mask=None, position_ids=pos, position_embeddings=rotary, cache=cache, use_cache=True)
                token, next_position = base.lm_head(lm.norm(x))[0, -1].argmax(), next_position + 1
        finally:
            hook.remove()
    assert math.isfinite(float(logits.sum()))
    return logits, span, out
