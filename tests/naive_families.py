"""Naive, sample-by-sample forwards of the model families added for issue 9 (g8): open_clip's
VisionTransformer, timm's Eva with rotary embeddings, and timm's attention-pool head (``global_pool='map'``);
and of the Hugging Face video ViTs (issue 10): VideoMAE and ViViT over their tubelet tokens.

Each is written from the library's documented computation, one image at a time, with a hand-written
attention (and rotary embedding, and attention pool); none shares code with tokenreduce. After each block's
attention, ``step(layer, t, k, probs, size, pos)`` returns the new ``(t, size, pos)``: ``t [N, C]`` the
tokens, ``k [H, N, D]`` the keys the attention used, ``probs [H, N, N]``, ``size [N]`` original tokens
per token, and ``pos`` a list giving, for every token, the original token whose position (rotary row) it
holds. With ``prop_attn`` the blocks' attention, and an attention pool's, add ``log(size)`` to the logits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

import reference


def tome_step(r: list[int], prefix: int):
    """ToMe as a ``step``: bipartite matching on the head-averaged keys (alternate tokens, cosine
    similarity), the ``r[layer]`` best-matched A tokens averaged into their B partners by size; a merged
    token keeps its B token's position."""

    def step(layer, t, k, probs, size, pos):
        n, metric = t.shape[0], k.mean(0)
        side_a = [i for i in range(prefix, n) if i % 2 == 0]
        side_b = [j for j in range(prefix, n) if j % 2 == 1]
        cos = {(i, j): float(metric[i] @ metric[j] / (metric[i].norm() * metric[j].norm())) for i in side_a for j in side_b}
        partner = {i: max(side_b, key=lambda j: cos[i, j]) for i in side_a}
        ranked = sorted(side_a, key=lambda i: -cos[i, partner[i]])
        merged = set(ranked[: r[layer]])
        staying = [i for i in ranked if i not in merged]
        order = list(range(prefix)) + (sorted(staying) if prefix else staying)
        rows, sizes, where = [t[i] for i in order], [size[i] for i in order], [pos[i] for i in order]
        for j in side_b:
            members = [j] + [i for i in side_a if i in merged and partner[i] == j]
            total = sum(float(size[i]) for i in members)
            rows.append(sum(t[i] * (float(size[i]) / total) for i in members))
            sizes.append(torch.tensor(total))
            where.append(pos[j])
        return torch.stack(rows), torch.stack(sizes), where

    return step


def evit_step(layers: tuple[int, ...], keep_rate: float, prefix: int, fuse: bool):
    """EViT (``fuse``) or Top-K as a ``step`` at ``layers``, scored by the CLS row of the attention
    (:func:`reference.evit_step`); the fused token takes the position of the first dropped token."""

    def step(layer, t, k, probs, size, pos):
        if layer not in layers:
            return t, size, pos
        scores = probs[:, 0].mean(0)
        t, size = reference.evit_step(t, size, scores, keep_rate, prefix, fuse)
        others = list(range(prefix, len(pos)))
        ranked = sorted(others, key=lambda i: -float(scores[i]))
        keep = math.ceil(keep_rate * len(others))
        dropped = sorted(ranked[keep:])
        where = [pos[i] for i in range(prefix)] + [pos[i] for i in ranked[:keep]]
        return t, size, where + ([pos[dropped[0]]] if fuse and dropped else [])

    return step


def _softmax_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, bias) -> tuple[Tensor, Tensor]:
    """``q [H, L, D]``, ``k``/``v [H, S, D]``; ``bias`` added to every row of logits. Returns
    (heads merged ``[L, H * D]``, probabilities ``[H, L, S]``)."""
    probs = ((q @ k.transpose(-1, -2)) * scale + bias).softmax(dim=-1)
    return (probs @ v).transpose(0, 1).reshape(q.shape[1], -1), probs


def _heads(t: Tensor, width: int) -> Tensor:
    return t.reshape(t.shape[0], -1, width).transpose(0, 1)


# -- open_clip -----------------------------------------------------------------------------------


def _cross_attention(mha, query: Tensor, keys: Tensor, bias) -> Tensor:
    """``nn.MultiheadAttention(query, keys, keys)`` for one sample, its fused in-projection split by hand."""
    e, d = mha.embed_dim, mha.head_dim
    w, b = mha.in_proj_weight, mha.in_proj_bias
    q = _heads(query @ w[:e].T + b[:e], d)
    k = _heads(keys @ w[e : 2 * e].T + b[e : 2 * e], d)
    v = _heads(keys @ w[2 * e :].T + b[2 * e :], d)
    out, _ = _softmax_attention(q, k, v, d**-0.5, bias)
    return mha.out_proj(out)


def openclip_forward(model, images: Tensor, step, prop_attn: bool = True) -> Tensor:
    """open_clip ``VisionTransformer`` (class token first, ``ResidualAttentionBlock`` or the custom block)
    to its projected image embedding, one image at a time; ``'avg'`` pools by size."""
    outs = []
    with torch.no_grad():
        for image in images:
            patches = model.conv1(image[None])[0].flatten(1).T  # [P, C]
            t = model.ln_pre(torch.cat([model.class_embedding[None], patches]) + model.positional_embedding)
            size, pos = torch.ones(t.shape[0]), list(range(t.shape[0]))
            for layer, blk in enumerate(model.transformer.resblocks):
                attn, h = blk.attn, blk.ln_1(t)
                q, k, v = (_heads(part, attn.head_dim) for part in (h @ attn.in_proj_weight.T + attn.in_proj_bias).chunk(3, -1))
                custom = hasattr(attn, "ln_q")  # open_clip's own Attention
                if custom:
                    q, k = attn.ln_q(q), attn.ln_k(k)
                probs = ((q @ k.transpose(-1, -2)) / math.sqrt(attn.head_dim) + (size.log() if prop_attn else 0.0)).softmax(-1)
                heads_out = probs @ v
                if custom:
                    heads_out = heads_out * attn.head_scale if attn.head_scale is not None else heads_out
                    out = blk.ln_attn(attn.out_proj(attn.ln_inner(heads_out.transpose(0, 1).reshape(h.shape[0], -1))))
                else:
                    out = attn.out_proj(heads_out.transpose(0, 1).reshape(h.shape[0], -1))
                t = t + blk.ls_1(out)
                t, size, pos = step(layer, t, k, probs, size, pos)
                t = t + blk.ls_2(blk.mlp(blk.ln_2(t)))
            if model.attn_pool is not None:  # CoCa: latent queries over all tokens, then the first query
                pool = model.attn_pool
                t = model.ln_post(
                    _cross_attention(pool.attn, pool.ln_q(pool.query), pool.ln_k(t), size.log() if prop_attn else 0.0)
                )
                pooled = t[0]
            elif model.pool_type == "avg":
                t = t if model.final_ln_after_pool else model.ln_post(t)
                pooled = (t[1:] * size[1:, None]).sum(0) / size[1:].sum()
                pooled = model.ln_post(pooled) if model.final_ln_after_pool else pooled
            else:
                pooled = model.ln_post(t)[0]
            outs.append(pooled @ model.proj)
    return torch.stack(outs)


# -- timm Eva --------------------------------------------------------------------------------------


def _rotate_token(x: Tensor, row: Tensor, half: bool) -> Tensor:
    """RoPE on one token of one head, ``x [D]``, by ``row [2 D]`` (sines, then cosines): each channel pair,
    adjacent ``(2c, 2c + 1)`` or across the halves ``(c, c + D/2)`` when ``half``, turned by its angle:
    ``x_c cos_c - x_partner sin_c`` for the first of a pair, ``x_c cos_c + x_partner sin_c`` for the second."""
    d = x.shape[0]
    sin, cos = row[:d], row[d:]
    if half:
        partner = torch.cat([-x[d // 2 :], x[: d // 2]])
    else:
        partner = torch.stack([-x[1::2], x[0::2]], dim=1).flatten()
    return x * cos + partner * sin


def _row(table: Tensor, head: int, index: int) -> Tensor:
    return table[index] if table.dim() == 2 else table[head, index]


def _eva_attention(attn, h: Tensor, table, pos: list[int], bias) -> tuple[Tensor, Tensor, Tensor]:
    """EvaAttention / AttentionRope on one sample ``h [N, C]``, rows of ``table`` (``[N0 - P, 2 D]`` or
    ``[H, N0 - P, 2 D]``) taken at ``pos``. Returns (output, keys after rotation, probabilities)."""
    n, d, heads, p = h.shape[0], attn.head_dim, attn.num_heads, attn.num_prefix_tokens
    if attn.qkv is not None:
        bias_qkv = attn.qkv.bias if getattr(attn, "q_bias", None) is None else torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])
        q, k, v = (h @ attn.qkv.weight.T + (0.0 if bias_qkv is None else bias_qkv)).chunk(3, -1)
    else:
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
    q, k, v = _heads(q, d), _heads(k, d), _heads(v, d)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if table is not None:  # each token after the prefix turned by the row of the position it holds
        half = getattr(attn, "rotate_half", False)

        def rotated(t: Tensor) -> Tensor:
            return torch.stack(
                [
                    torch.stack(
                        [t[a, i] if i < p else _rotate_token(t[a, i], _row(table, a, pos[i] - p), half) for i in range(n)]
                    )
                    for a in range(t.shape[0])
                ]
            )

        q, k = rotated(q), rotated(k)
    k, v = k.repeat_interleave(heads // k.shape[0], 0), v.repeat_interleave(heads // v.shape[0], 0)
    out, probs = _softmax_attention(q, k, v, attn.scale, bias)
    return attn.proj(attn.norm(out)), k, probs


def latent_pool(pool, x: Tensor, bias) -> Tensor:
    """timm ``AttentionPoolLatent`` on one sample ``x [S, C]``: its latent queries attend over ``x``, then
    projection and a residual MLP; its first query (``pool='token'``) or their mean."""
    q = _heads(pool.q(pool.latent[0]), pool.head_dim)
    k, v = (_heads(part, pool.head_dim) for part in pool.kv(x).chunk(2, -1))
    out, _ = _softmax_attention(pool.q_norm(q), pool.k_norm(k), v, pool.scale, bias)
    out = pool.proj(out)
    out = out + pool.mlp(pool.norm(out))
    return out[0] if pool.pool == "token" else out.mean(0)


def _head(model, t: Tensor, size: Tensor, prop_attn: bool, pool_prefix: bool) -> Tensor:
    """A timm model's pooling and head on its final tokens ``t``: attention pool (over all tokens, or those
    after the prefix), class token, or the size-weighted mean of the tokens after the prefix."""
    p = model.num_prefix_tokens
    if model.attn_pool is not None:
        start = 0 if pool_prefix else p
        pooled = latent_pool(model.attn_pool, t[start:], size[start:].log() if prop_attn else 0.0)
    elif model.global_pool == "token":
        pooled = t[0]
    else:
        pooled = (t[p:] * size[p:, None]).sum(0) / size[p:].sum()
    return model.head(model.fc_norm(pooled))


def eva_forward(model, images: Tensor, step, prop_attn: bool = True) -> Tensor:
    """timm ``Eva`` with pre-norm ``EvaBlock`` s, its rotary table (one for all blocks, or per block for
    ``mixed``) taken at each token's position, to its logits, one image at a time."""
    outs = []
    with torch.no_grad():
        tokens, table = model._pos_embed(model.patch_embed(images))
        for t in model.norm_pre(tokens):
            size, pos = torch.ones(t.shape[0]), list(range(t.shape[0]))
            for layer, blk in enumerate(model.blocks):
                rows = table[layer] if table is not None and model.rope_mixed else table
                out, k, probs = _eva_attention(blk.attn, blk.norm1(t), rows, pos, size.log() if prop_attn else 0.0)
                t = t + (out if blk.gamma_1 is None else blk.gamma_1 * out)
                t, size, pos = step(layer, t, k, probs, size, pos)
                m = blk.mlp(blk.norm2(t))
                t = t + (m if blk.gamma_2 is None else blk.gamma_2 * m)
            outs.append(_head(model, model.norm(t), size, prop_attn, pool_prefix=True))
    return torch.stack(outs)


# -- timm VisionTransformer with an attention-pool head -------------------------------------------


def vit_map_forward(model, images: Tensor, step, prop_attn: bool = True) -> Tensor:
    """timm ``VisionTransformer`` with ``global_pool='map'`` (SigLIP's head), blocks as
    :func:`reference.attention` writes them out, to its logits, one image at a time."""
    outs = []
    with torch.no_grad():
        for t in model.norm_pre(model._pos_embed(model.patch_embed(images))):
            size, pos = torch.ones(t.shape[0]), list(range(t.shape[0]))
            for layer, blk in enumerate(model.blocks):
                out, k, probs = reference.attention(blk.attn, blk.norm1(t), size.log() if prop_attn else 0.0)
                t = t + blk.ls1(out)
                t, size, pos = step(layer, t, k, probs, size, pos)
                t = t + blk.ls2(blk.mlp(blk.norm2(t)))
            outs.append(_head(model, model.norm(t), size, prop_attn, pool_prefix=model.pool_include_prefix))
    return torch.stack(outs)


# -- Hugging Face video ViTs ----------------------------------------------------------------------


def _video_attention(blk, h: Tensor, bias) -> tuple[Tensor, Tensor, Tensor]:
    """The attention of a ``VideoMAELayer`` (inner ``query``/``key``/``value``, ``output.dense``) or a
    ``VivitLayer`` (``q_proj``/``k_proj``/``v_proj``, ``o_proj``) on one video's tokens ``h [N, C]``.
    Returns (output, keys, probabilities)."""
    if hasattr(blk, "intermediate"):  # VideoMAE
        inner = blk.attention.attention
        q, k, v = (_heads(p(h), inner.attention_head_size) for p in (inner.query, inner.key, inner.value))
        out, probs = _softmax_attention(q, k, v, inner.attention_head_size**-0.5, bias)
        return blk.attention.output.dense(out), k, probs
    attn = blk.attention
    q, k, v = (_heads(p(h), attn.head_dim) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    out, probs = _softmax_attention(q, k, v, attn.head_dim**-0.5, bias)
    return attn.o_proj(out), k, probs


def _video_mlp(blk, t: Tensor) -> Tensor:
    h = blk.layernorm_after(t)
    return blk.output.dense(blk.intermediate(h)) if hasattr(blk, "intermediate") else blk.mlp(h)


def video_forward(model, videos: Tensor, step, prop_attn: bool = True) -> Tensor:
    """``VideoMAEModel`` or ``VivitModel`` to its last hidden state, one video ``[T, C, H, W]`` at a time:
    every tubelet token (and ViViT's class token) in one sequence, pre-norm layers written out."""
    videomae = hasattr(model, "encoder")
    layers = model.encoder.layer if videomae else model.layers
    outs = []
    with torch.no_grad():
        for video in videos:
            t = (model.embeddings(video[None], None) if videomae else model.embeddings(video[None]))[0]
            size, pos = torch.ones(t.shape[0]), list(range(t.shape[0]))
            for layer, blk in enumerate(layers):
                out, k, probs = _video_attention(blk, blk.layernorm_before(t), size.log() if prop_attn else 0.0)
                t = t + out
                t, size, pos = step(layer, t, k, probs, size, pos)
                t = t + _video_mlp(blk, t)
            outs.append(t if model.layernorm is None else model.layernorm(t))
    return torch.stack(outs)
