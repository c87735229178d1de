"""Independent, deliberately naive re-implementations of the papers' algorithms, one sample at a time.

They share no code with tokenreduce: Python loops over tokens instead of gathers and scatters, and a
hand-written attention instead of timm's. Agreement with them is what "reproduces the reference
behaviour" means in the tests.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def tome_merge(x: Tensor, metric: Tensor, size: Tensor, r: int, prefix: int) -> tuple[Tensor, Tensor]:
    """One ToMe step on a single sample: ``x [N, C]``, ``metric [N, D]``, ``size [N]``."""
    n = x.shape[0]
    a_side = [i for i in range(0, n, 2) if i >= prefix]
    b_side = [j for j in range(1, n, 2) if j >= prefix]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    best = {}
    for i in a_side:
        sims = [float(unit[i] @ unit[j]) for j in b_side]
        k = max(range(len(b_side)), key=lambda t: sims[t])
        best[i] = (sims[k], b_side[k])
    ranked = sorted(a_side, key=lambda i: -best[i][0])
    merged, kept = ranked[:r], ranked[r:]
    if prefix:
        kept = sorted(kept)  # the reference restores position order when a CLS token is present
    rows, sizes = [x[i] for i in range(prefix)], [size[i] for i in range(prefix)]
    rows += [x[i] for i in kept]
    sizes += [size[i] for i in kept]
    for j in b_side:
        group = [j] + [i for i in merged if best[i][1] == j]
        w = torch.stack([size[i] for i in group])
        rows.append(sum(x[i] * size[i] for i in group) / w.sum())
        sizes.append(w.sum())
    return torch.stack(rows), torch.stack(sizes)


def evit_step(x: Tensor, size: Tensor, cls_attn: Tensor, keep_rate: float, prefix: int, fuse: bool) -> tuple[Tensor, Tensor]:
    """One EViT (``fuse``) or Top-K step on one sample; ``cls_attn [N]`` over all tokens."""
    n_np = x.shape[0] - prefix
    keep = math.ceil(keep_rate * n_np)
    scores = cls_attn[prefix:].tolist()
    order = sorted(range(n_np), key=lambda i: -scores[i])
    top, rest = order[:keep], sorted(order[keep:])
    rows = [x[i] for i in range(prefix)] + [x[prefix + i] for i in top]
    sizes = [size[i] for i in range(prefix)] + [size[prefix + i] for i in top]
    if fuse and rest:
        rows.append(sum(x[prefix + i] * scores[i] for i in rest))
        sizes.append(sum(size[prefix + i] for i in rest))
    return torch.stack(rows), torch.stack(sizes)


def attention(attn, t: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A timm ``Attention`` written out for one sample ``t [N, C]``: returns (output, keys, probs)."""
    n = t.shape[0]
    h, d = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(t).reshape(n, 3, h, d).permute(1, 2, 0, 3)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q @ k.transpose(-1, -2)) * attn.scale + bias).softmax(dim=-1)
    out = (probs @ v).transpose(0, 1).reshape(n, h * d)
    return attn.proj(attn.norm(out)), k, probs


def vit_forward(model, images: Tensor, step, prop_attn: bool = True, at_end: bool = False) -> Tensor:
    """Run a pre-norm timm ViT sample by sample, calling ``step(layer, t, keys, probs, size)`` after
    each attention (``at_end``: after each MLP, with that block's keys and probs); it returns the new
    ``(t, size)``. Sizes weight average pooling and, with ``prop_attn``, attention."""
    outs = []
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for t in tokens:
            size = torch.ones(t.shape[0])
            for layer, blk in enumerate(model.blocks):
                out, k, probs = attention(blk.attn, blk.norm1(t), size.log() if prop_attn else 0.0)
                t = t + blk.ls1(out)
                if not at_end:
                    t, size = step(layer, t, k, probs, size)
                t = t + blk.ls2(blk.mlp(blk.norm2(t)))
                if at_end:
                    t, size = step(layer, t, k, probs, size)
            t = model.norm(t)
            if model.global_pool == "avg":
                p = model.num_prefix_tokens
                pooled = (t[p:] * size[p:, None]).sum(0) / size[p:].sum()
            else:
                pooled = t[0]
            outs.append(model.head(model.fc_norm(pooled)))
    return torch.stack(outs)


# Hugging Face towers written out: (norm before attention, attention, layer scale after attention,
# norm before MLP, layer scale after MLP, output projection, norm on the final sequence or None).
HF_PARTS = {
    "CLIPVisionModel": ("layer_norm1", "self_attn", None, "layer_norm2", None, "out_proj", None),
    "SiglipVisionModel": ("layer_norm1", "self_attn", None, "layer_norm2", None, "out_proj", "post_layernorm"),
    "Dinov2Model": ("norm1", "attention", "layer_scale1", "norm2", "layer_scale2", "o_proj", "layernorm"),
    "ViTModel": ("layernorm_before", "attention", None, "layernorm_after", None, "o_proj", "layernorm"),
}


def hf_tower_forward(model, images: Tensor, step, prop_attn: bool = True) -> Tensor:
    """A Hugging Face vision tower run sample by sample with hand-written attention; ``step`` as in
    :func:`vit_forward`. Returns the last hidden state (stacked; every sample has the same count)."""
    norm1, attn_name, ls1, norm2, ls2, proj, final = HF_PARTS[type(model).__name__]
    layers = model.encoder.layers if hasattr(model, "encoder") and hasattr(model.encoder, "layers") else None
    layers = layers if layers is not None else (model.encoder.layer if hasattr(model, "encoder") else model.layers)
    outs = []
    with torch.no_grad():
        tokens = model.embeddings(images)
        if hasattr(model, "pre_layrnorm"):
            tokens = model.pre_layrnorm(tokens)
        for t in tokens:
            size = torch.ones(t.shape[0])
            for layer, blk in enumerate(layers):
                attn = getattr(blk, attn_name)
                h = getattr(blk, norm1)(t)
                n, heads = h.shape[0], attn.q_proj.out_features // attn.head_dim
                q, k, v = (p(h).reshape(n, heads, attn.head_dim).transpose(0, 1) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
                scale = attn.head_dim**-0.5
                probs = ((q @ k.transpose(-1, -2)) * scale + (size.log() if prop_attn else 0.0)).softmax(dim=-1)
                out = getattr(attn, proj)((probs @ v).transpose(0, 1).reshape(n, -1))
                t = t + (getattr(blk, ls1)(out) if ls1 else out)
                t, size = step(layer, t, k, probs, size)
                m = blk.mlp(getattr(blk, norm2)(t))
                t = t + (getattr(blk, ls2)(m) if ls2 else m)
            outs.append(getattr(model, final)(t) if final else t)
    return torch.stack(outs)


def divprune_select(features: Tensor, k: int) -> list[int]:
    """DivPrune on one image ``features [N, D]``: a greedy max-min subset by cosine distance, returned
    in position order."""
    n = features.shape[0]
    unit = [f / f.norm() for f in features.double()]
    dist = [[1.0 - float(unit[i] @ unit[j]) for j in range(n)] for i in range(n)]
    second = [sorted(dist[i][j] for i in range(n))[min(1, n - 1)] for j in range(n)]
    picked = [max(range(n), key=lambda j: (second[j], -j))]
    while len(picked) < k:
        spread = [min(dist[s][j] for s in picked) for j in range(n)]
        picked.append(max(range(n), key=lambda j: (spread[j], -j)))
    return sorted(picked)


def visionzip_tokens(
    hidden: Tensor, probs: Tensor, keys: Tensor, dominant: int, contextual: int, cls: bool, with_dominant: bool = False
):
    """VisionZip on one image: ``hidden [T, D]`` hidden states of the read layer, ``probs [H, T, T]`` its
    attention, ``keys [H, T, d]`` its keys. Returns the dominant then contextual tokens ``[K, D]`` (and
    the dominant tokens' indices when ``with_dominant``)."""
    t = hidden.shape[0]
    if cls:
        score = {j: float(probs[:, 0, j].sum()) for j in range(1, t)}
        top = sorted(score, key=lambda j: -score[j])[: dominant - 1]
        dom = sorted([0, *top])
    else:
        score = {j: float(probs[:, :, j].mean()) for j in range(t)}
        dom = sorted(sorted(score, key=lambda j: -score[j])[:dominant])
    rest = [i for i in range(t) if i not in dom]
    metric = keys.mean(0)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    step = max(1, len(rest) // contextual) if contextual else 1
    targets = [rest[i] for i in range(0, len(rest), step)][:contextual]
    groups: dict[int, list[int]] = {tgt: [] for tgt in targets}
    for i in rest:
        if i not in targets:
            sims = [float(unit[i] @ unit[tgt]) for tgt in targets]
            groups[targets[max(range(len(targets)), key=lambda a: (sims[a], -a))]].append(i)
    out = [hidden[i] for i in dom]
    for tgt in targets:
        extra = torch.stack([hidden[i] for i in groups[tgt]]).mean(0) if groups[tgt] else torch.zeros_like(hidden[tgt])
        out.append(hidden[tgt] + extra)
    return (torch.stack(out), dom) if with_dominant else torch.stack(out)
