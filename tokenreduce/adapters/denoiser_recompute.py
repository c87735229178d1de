"""Recomputing chosen tokens of a diffusers denoiser's sub-modules, the others reused from the previous step.

A method that recomputes only some tokens per step (:class:`~tokenreduce.methods.denoiser.Recompute`,
CAT Pruning) does not shrink a block's sequence: each wrapped sub-module still gives back every token,
but only the chosen rows are computed afresh and the rest are its outputs of the last step that
computed them, kept in the plan's cache (:class:`ModuleCache`). That is a different engine from the
merge-and-spread one of :mod:`tokenreduce.adapters.diffusers_denoisers`, which calls :func:`recomputed`
from each wrapped sub-module while a block runs under a :class:`Recompute` plan, and
:func:`attention_problem` when checking a model at apply.

A token-wise sub-module (MLP, cross-attention) simply runs on the chosen rows. Self-attention (and the
image side of SD3's joint attention) needs queries for the chosen tokens against keys and values of all
of them, which ``AttnProcessor2_0`` and ``JointAttnProcessor2_0`` cannot take (they project q, k and v
from one ``hidden_states``): :func:`_chosen_attention` computes their math from the module's own parts
(``to_q``/``to_k``/``to_v``, ``norm_q``/``norm_k``, ``add_*_proj`` and ``norm_added_*`` for the text,
SDPA at its default scale, ``to_out``, ``to_add_out``), so it is checked at apply that every such module
uses one of those two processors. Steps it computes in full run the module's own processor untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenreduce.methods.denoiser import Recompute

# The processors whose math _chosen_attention computes (diffusers 0.42.1): q, k, v projected, split
# into heads, normed per head (norm_q, norm_k; norm_added_* for the text), text rows after the image
# rows, SDPA at its default scale, heads merged, to_out (and to_add_out for the text).
SPARSE_QUERY_PROCESSORS = ("AttnProcessor2_0", "JointAttnProcessor2_0")


@dataclass
class ModuleCache:
    """One wrapped sub-module's outputs of the last call that computed it, kept in a Recompute cache."""

    output: Tensor | None = None  # [B, N, C] its image output
    keys: Tensor | None = None  # [B, H, N, D] for attention: the image tokens' keys (after norm_k) ...
    values: Tensor | None = None  # ... and values


def recomputed(
    module: nn.Module,
    forward: Callable[..., Any],
    plan: Recompute,
    x: Tensor,
    args: tuple,
    kwargs: dict,
    *,
    text: Tensor | None,
    joint: bool,
) -> Any:
    """Run a wrapped sub-module on its image tokens ``x [B, N, C]`` under a :class:`Recompute` plan: on
    every token, filling the cache (``plan.index`` None), or on the chosen tokens only, the others'
    outputs taken from the cache. ``forward`` is the module's own forward, ``args``/``kwargs`` its other
    arguments, ``text`` its ``encoder_hidden_states`` and ``joint`` whether it is SD3's joint attention
    (returning ``(image, text)``)."""
    cache = plan.cache.setdefault(module, ModuleCache())
    # Self-attention needs every token's keys and values; cross-attention and MLPs are token-wise.
    attends = joint or (text is None and hasattr(module, "to_q"))
    if plan.index is None:
        out = forward(x, *args, **kwargs)
        cache.output = (out[0] if isinstance(out, tuple) else out).detach()
        if attends:
            cache.keys = _heads(module, module.to_k(x), module.norm_k).detach()
            cache.values = _heads(module, module.to_v(x)).detach()
        return out
    index = plan.index
    if cache.output is None or cache.output.shape[:2] != x.shape[:2] or index.shape[0] != x.shape[0]:
        cached = None if cache.output is None else tuple(cache.output.shape[:2])
        raise RuntimeError(
            f"a recomputing block got {tuple(x.shape[:2])} (batch, tokens) and {index.shape[0]} index rows, but its "
            f"cache holds {cached}: the calls of one generation must keep their batch and size"
        )
    chosen = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
    if attends:
        out = _chosen_attention(module, chosen, index, cache, text if joint else None, args, kwargs)
    else:
        out = forward(chosen, *args, **kwargs)
    rows = out[0] if isinstance(out, tuple) else out
    full = cache.output.scatter(1, index[..., None].expand(-1, -1, rows.shape[-1]), rows)
    cache.output = full.detach()
    return (full, *out[1:]) if isinstance(out, tuple) else full


def attention_problem(attn: nn.Module) -> str | None:
    """Why :func:`_chosen_attention` cannot stand in for this attention module, or ``None``."""
    name = type(getattr(attn, "processor", None)).__name__
    if name not in SPARSE_QUERY_PROCESSORS:
        return f"its attention processor is {name}, not one of {', '.join(SPARSE_QUERY_PROCESSORS)}"
    extras = [n for n in ("group_norm", "spatial_norm") if getattr(attn, n, None) is not None]
    if getattr(attn, "residual_connection", False) or getattr(attn, "rescale_output_factor", 1.0) != 1.0:
        extras.append("residual_connection or rescale_output_factor")
    return f"it uses {', '.join(extras)}" if extras else None


def _heads(attn: nn.Module, t: Tensor, norm: nn.Module | None = None) -> Tensor:
    """A projection ``[B, L, H * D]`` split into heads ``[B, H, L, D]``, then ``norm`` per head."""
    t = t.view(t.shape[0], -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)
    return t if norm is None else norm(t)


def _chosen_attention(
    attn: nn.Module, x: Tensor, index: Tensor, cache: ModuleCache, text: Tensor | None, args: tuple, kwargs: dict
) -> Any:
    """Self-attention (``text`` None) or SD3 joint attention for the image tokens ``x [B, n, C]`` at
    ``index [B, n]`` only: their queries against the keys and values of all image tokens, the cached
    ones with the rows at ``index`` replaced by fresh ones (then cached), plus the text's. Returns
    the image output ``[B, n, C]``, or ``(image, text)`` as the joint processor does."""
    problem = attention_problem(attn)
    extra = [name for name, value in kwargs.items() if value is not None and name != "encoder_hidden_states"]
    if problem is not None or extra or len(args) > 1:
        why = problem or f"it was called with {extra or 'extra positional arguments'}"
        raise NotImplementedError(f"recomputing chosen tokens of {type(attn).__name__} is not supported: {why}")
    query = _heads(attn, attn.to_q(x), attn.norm_q)
    rows = index[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[-1])
    keys = cache.keys.scatter(2, rows, _heads(attn, attn.to_k(x), attn.norm_k))
    values = cache.values.scatter(2, rows, _heads(attn, attn.to_v(x)))
    cache.keys, cache.values = keys.detach(), values.detach()
    if text is not None:
        query = torch.cat([query, _heads(attn, attn.add_q_proj(text), getattr(attn, "norm_added_q", None))], dim=2)
        keys = torch.cat([keys, _heads(attn, attn.add_k_proj(text), getattr(attn, "norm_added_k", None))], dim=2)
        values = torch.cat([values, _heads(attn, attn.add_v_proj(text))], dim=2)
    out = F.scaled_dot_product_attention(query, keys, values, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(x.shape[0], -1, query.shape[1] * query.shape[-1]).to(query.dtype)
    image = attn.to_out[1](attn.to_out[0](out[:, : x.shape[1]]))
    if text is None:
        return image
    text_out = out[:, x.shape[1] :]
    return image, text_out if attn.context_pre_only else attn.to_add_out(text_out)
