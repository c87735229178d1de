"""FrameFusion written from the spec with Python loops, sharing no code with tokenreduce: the merge of
one video's tokens, the prune count, and a whole prefill and greedy decode of an unpatched eager LLaVA
with those merges and prunes applied by hand."""

from __future__ import annotations

import math

import torch


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a * b).sum() / (a.norm() * b.norm()))


def frame_labels(n: int, frames: int, patches: int) -> list[int]:
    return [i % patches if i < frames * patches else -1 for i in range(n)]


def budget(sparsity: list[float], cost: float, num_layers: int) -> float:
    """The reference's _compute_pruning_ratio, written out (1 where the reference raises)."""
    s, total = 1.0, 0.0
    for r in sparsity:
        s = s * (1 - r)
        total = total + s
    remain = num_layers * cost - total
    if remain < 0:
        return 1.0
    share = remain / (max(1, num_layers - len(sparsity)) * s)
    return 0.0 if share > 1 else 1 - share


def merge_groups(x: torch.Tensor, labels: list[int], threshold: float, cap: float) -> tuple[list[list[int]], bool, float]:
    """``x [N, D]`` a video's tokens, ``labels`` their patches -> the groups ``[head, merged...]`` (heads
    in order), whether the cap bound, and the merged share. A token at least ``threshold`` similar to
    the previous token of its patch merges, unless those are a share ``cap`` or more of the tokens:
    then the ``int(cap * N)`` most similar merge. A merged token joins the last unmerged token before it
    at its patch."""
    n = x.shape[0]
    similarity = {}
    for i in range(n):
        before = [j for j in range(i) if labels[i] >= 0 and labels[j] == labels[i]]
        if before:
            similarity[i] = cosine(x[i], x[before[-1]])
    merged = {i for i, s in similarity.items() if s >= threshold}
    share, capped = len(merged) / n, len(merged) / n >= cap
    if capped:
        ranked = sorted(similarity, key=lambda i: -similarity[i])
        merged = set(ranked[: min(int(cap * n), len(ranked))])
    head_of = {}
    for i in range(n):
        if i not in merged:
            head_of[i] = i
        else:
            head_of[i] = head_of[[j for j in range(i) if labels[j] == labels[i]][-1]]
    groups = {}
    for i in range(n):
        groups.setdefault(head_of[i], []).append(i)
    return [groups[h] for h in sorted(groups)], capped, share


def prune_count(tokens: int, sparsity: list[float], cost: float, num_layers: int) -> int:
    return min(tokens, max(1, round(tokens * (1 - budget(sparsity, cost, num_layers)))))


def naive_received(q: torch.Tensor, k: torch.Tensor, rows: list[int], scale: float, token: int) -> float:
    """The attention ``token`` receives from the queries at ``rows`` (``q [H, L, D]``, ``k [H_kv, L, D]``,
    causal, every earlier token visible), mean over heads and those rows."""
    heads, group = q.shape[0], q.shape[0] // k.shape[0]
    total = 0.0
    for h in range(heads):
        for r in rows:
            logits = [float(q[h, r] @ k[h // group, j]) * scale for j in range(r + 1)]
            top = max(logits)
            weights = [math.exp(v - top) for v in logits]
            total += (weights[token] / sum(weights)) if token <= r else 0.0
    return total / (heads * len(rows))


def top_in_order(scores: list[float], count: int) -> list[int]:
    return sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:count])


def llava_prefill_and_decode(base, input_ids, pixel_values, image_token, frames, patches, config, new_tokens):
    """An unpatched eager LLaVA (batch 1, no padding) run layer by layer: from the input of
    ``config["layer"]`` on, the video span's tokens merge (group means, at the head's position) layer
    after layer while each layer merges a share of at least ``ratio_lower_bound`` under the budget's cap;
    at the next layer they are pruned by the last token's attention at the layer before (mean over
    heads), unless the cap bound; kept tokens keep their position ids; then greedy decoding with a
    cache. Returns the last prompt logits, the kept tokens' indices in the span and the generated tokens."""
    from transformers import DynamicCache

    layer, cost, threshold = config["layer"], config["cost"], config["similarity_lower_bound"]
    lower, num_layers = config.get("ratio_lower_bound", 0.1), config.get("num_layers", 28)
    lm = base.model.language_model
    with torch.no_grad():
        h = base.get_input_embeddings()(input_ids).clone()
        feats = base.model.get_image_features(pixel_values=pixel_values).pooler_output[0]
        where = (input_ids[0] == image_token).nonzero().flatten().tolist()
        start, n = where[0], len(where)
        h[0, start : start + n] = feats
        positions = list(range(input_ids.shape[1]))
        span = list(range(n))  # span index (at the LLM input) of each current span token
        labels = frame_labels(n, frames, patches)
        sparsity, merging, pruned = [], True, False
        captured = {}
        hooks = [block.self_attn.register_forward_hook(lambda m, a, out: captured.update(probs=out[1])) for block in lm.layers]
        cache = DynamicCache(config=lm.config)
        try:
            for i, block in enumerate(lm.layers):
                if i >= layer and merging:
                    groups, capped, share = merge_groups(
                        h[0, start : start + len(span)], labels, threshold, budget(sparsity, cost, num_layers)
                    )
                    if capped:
                        merging, pruned = False, True
                    else:
                        sparsity.append(share)
                        merging = share >= lower
                    merged = torch.stack([h[0, start + torch.tensor(g)].float().mean(0) for g in groups]).to(h.dtype)
                    h = torch.cat([h[:, :start], merged[None], h[:, start + len(span) :]], dim=1)
                    heads = [g[0] for g in groups]
                    positions = positions[:start] + [positions[start + j] for j in heads] + positions[start + len(span) :]
                    span, labels = [span[j] for j in heads], [labels[j] for j in heads]
                elif i >= layer and not pruned:
                    queries = config.get("query_tokens", 1)  # the previous layer's, on the merged tokens:
                    row = captured["probs"][0].mean(0)[-queries:].mean(0)
                    scores = [float(row[start + j]) for j in range(len(span))]
                    keep = top_in_order(scores, prune_count(len(span), sparsity, cost, num_layers))
                    rows = list(range(start)) + [start + j for j in keep] + list(range(start + len(span), h.shape[1]))
                    h, positions = h[:, rows], [positions[r] for r in rows]
                    span, labels, pruned = [span[j] for j in keep], [labels[j] for j in keep], True
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
            for hook in hooks:
                hook.remove()
    assert math.isfinite(float(logits.sum()))
    return logits, span, out
