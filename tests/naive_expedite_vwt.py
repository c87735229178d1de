"""Naive re-implementations of Expedite and VWT (intra-image), written from the specification
(``vit-methods.md`` sections 20 and 21): Python loops over tokens, one sample at a time, float64, and a
hand-written forward of a timm ViT. They share no code with tokenreduce."""

from __future__ import annotations

import math

import torch
from torch import Tensor


# -- Expedite ---------------------------------------------------------------------------------------
def adaptive_pool(x: Tensor, grid: tuple[int, int], cells: tuple[int, int]) -> Tensor:
    """``adaptive_avg_pool2d`` of the row-major tokens ``x [P, C]`` on ``grid`` to ``cells``: ``[h * w, C]``."""
    rows, cols = grid
    h, w = cells
    out = []
    for i in range(h):
        r0, r1 = (i * rows) // h, -(-((i + 1) * rows) // h)
        for j in range(w):
            c0, c1 = (j * cols) // w, -(-((j + 1) * cols) // w)
            members = [x[r * cols + c] for r in range(r0, r1) for c in range(c0, c1)]
            out.append(sum(members) / len(members))
    return torch.stack(out)


def soft_kmeans(x: Tensor, grid: tuple[int, int], cells: tuple[int, int], iters: int, window: int, tau: float) -> Tensor:
    """Expedite's clustering of one image's patch tokens ``x [P, C]``: the centroids ``[h * w, C]``."""
    x = x.double()
    rows, cols = grid
    h, w = cells
    reach = window // 2
    centroids = adaptive_pool(x, grid, cells)
    # the cell each token starts in: nearest-neighbour upsampling of the cell grid
    start = [((t // cols) * h // rows, (t % cols) * w // cols) for t in range(rows * cols)]
    for _ in range(iters):
        affinity = torch.zeros(rows * cols, h * w, dtype=torch.float64)
        for t in range(rows * cols):
            near = [k for k in range(h * w) if abs(k // w - start[t][0]) <= reach and abs(k % w - start[t][1]) <= reach]
            logits = torch.stack([-tau * ((x[t] - centroids[k]) ** 2).sum() for k in near])
            for k, a in zip(near, logits.softmax(dim=0)):
                affinity[t, k] = a
        new = []
        for k in range(h * w):
            total = affinity[:, k].sum()
            new.append(sum(affinity[t, k] * x[t] for t in range(rows * cols)) / max(float(total), 1e-16))
        centroids = torch.stack(new)
    return centroids


def reconstruction_weights(x: Tensor, centroids: Tensor, k: int | None, tau: float, norm: str) -> Tensor:
    """``[P, K]``: each token's weights on the centroids, ``exp(-tau * |x - c|^2)`` at its ``k`` largest,
    L2-normalised (``norm="l2"``) or summing to 1."""
    x, centroids = x.double(), centroids.double()
    out = torch.zeros(x.shape[0], centroids.shape[0], dtype=torch.float64)
    for t in range(x.shape[0]):
        weight = [math.exp(-tau * float(((x[t] - c) ** 2).sum())) for c in centroids]
        kth = sorted(weight, reverse=True)[(k or len(weight)) - 1]
        kept = [v if v >= kth else 0.0 for v in weight]
        scale = math.sqrt(sum(v * v for v in kept)) if norm == "l2" else sum(kept)
        out[t] = torch.tensor([v / scale for v in kept], dtype=torch.float64)
    return out


def expedite_forward(model, images: Tensor, location: int, cells: tuple[int, int], **kw) -> tuple[Tensor, list]:
    """A timm ViT with Expedite, one image at a time. ``kw``: ``iters``, ``window``, ``tau``, ``k``,
    ``recon_tau``, ``norm``, ``reconstruct``. Returns the logits and, per image, the tokens after each
    block and the reconstruction weights ``[P, K]`` (for dense heads)."""
    depth, p = len(model.blocks), model.num_prefix_tokens
    rows, cols = images.shape[-2] // model.patch_embed.patch_size[0], images.shape[-1] // model.patch_embed.patch_size[1]

    def end(layer, t, memo):
        if layer == location:
            patches = t[p:]
            centroids = soft_kmeans(patches, (rows, cols), cells, kw["iters"], kw["window"], kw["tau"])
            memo["weights"] = reconstruction_weights(patches, centroids, kw["k"], kw["recon_tau"], kw["norm"])
            return torch.cat([t[:p], centroids.to(t.dtype)])
        if layer == depth - 1 and kw["reconstruct"]:
            return torch.cat([t[:p], (memo["weights"] @ t[p:].double()).to(t.dtype)])
        return t

    return vit_forward(model, images, end=end)


# -- VWT (intra-image) ------------------------------------------------------------------------------
def vwt_keep(image: Tensor, patch: int, keep: int) -> list[int]:
    """The ``keep`` patches of one image ``[C, H, W]`` with the highest pixel variance (over all channels
    and pixels of the patch), equal variances to the lower index, in spatial order."""
    rows, cols = image.shape[1] // patch, image.shape[2] // patch
    variance = []
    for r in range(rows):
        for c in range(cols):
            values = image[:, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch].double().flatten().tolist()
            mean = sum(values) / len(values)
            variance.append(sum((v - mean) ** 2 for v in values) / len(values))
    order = sorted(range(rows * cols), key=lambda i: (-variance[i], i))
    return sorted(order[:keep])


def vwt_forward(model, images: Tensor, keep: int) -> tuple[Tensor, list]:
    p, patch = model.num_prefix_tokens, model.patch_embed.patch_size[0]
    return vit_forward(model, images, start=lambda image, t: torch.cat([t[:p], t[[p + i for i in vwt_keep(image, patch, keep)]]]))


# -- a timm ViT written out ----------------------------------------------------------------------------
def attention(attn, t: Tensor) -> Tensor:
    n, h, d = t.shape[0], attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(t).reshape(n, 3, h, d).permute(1, 2, 0, 3)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(dim=-1)
    return attn.proj(attn.norm((probs @ v).transpose(0, 1).reshape(n, h * d)))


def vit_forward(model, images: Tensor, start=None, end=None) -> tuple[Tensor, list]:
    """A pre-norm timm ``VisionTransformer`` run image by image with eager attention: ``start(image, t)``
    acts on the tokens entering block 0, ``end(layer, t, memo)`` on those leaving each block (``memo`` a
    dict per image). Plain (unweighted) pooling. Returns the logits and, per image, ``(tokens after each
    block, memo)``."""
    outs, trace = [], []
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for image, t in zip(images, tokens):
            memo, after = {}, []
            if start is not None:
                t = start(image, t)
            for layer, blk in enumerate(model.blocks):
                t = t + blk.ls1(attention(blk.attn, blk.norm1(t)))
                t = t + blk.ls2(blk.mlp(blk.norm2(t)))
                if end is not None:
                    t = end(layer, t, memo)
                after.append(t)
            t = model.norm(t)
            pooled = t[model.num_prefix_tokens :].mean(0) if model.global_pool == "avg" else t[0]
            logits = model.head(model.fc_norm(pooled))
            if hasattr(model, "head_dist"):  # DeiT distilled: the mean of the class and distillation heads
                logits = (logits + model.head_dist(t[1])) / 2
            outs.append(logits)
            trace.append((after, memo))
    return torch.stack(outs), trace
