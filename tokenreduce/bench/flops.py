"""Analytic compute of a (reduced) transformer from the token counts it actually ran with."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tokenreduce.adapters.base import Adapter, BlockCost
from tokenreduce.methods.base import Hook


def block_macs(cost: BlockCost, n_in: int, n_out: int) -> int:
    """Multiply-accumulates of one block whose attention sees ``n_in`` tokens and MLP ``n_out``.

    Linear layers scale with the token count; ``QK^T`` and ``AV`` add ``2 * n_in^2 * attn_dim``.
    """
    return cost.attn_macs_per_token * n_in + 2 * n_in * n_in * cost.attn_dim + cost.mlp_macs_per_token * n_out


def model_macs(adapter: Adapter, model, input_tokens: int, tokens_per_layer: Sequence[int], hook: Hook = Hook.ATTN) -> int:
    """MACs for one image: stem and head, plus every block at its recorded token counts.

    ``hook`` is where the method reduced inside each block: after attention (attention at the count
    entering the block, the MLP at the count leaving it), at the block start (both at the count
    leaving) or at its end (both at the count entering). The token-reduction literature reports these
    as "GFLOPs" (fvcore's convention: one multiply-accumulate counts once); the small cost of scoring
    and matching is not included.
    """
    costs = adapter.block_costs(model)
    if len(costs) != len(tokens_per_layer):
        raise ValueError(f"tokens_per_layer has {len(tokens_per_layer)} entries for {len(costs)} blocks")
    n_in = [input_tokens, *tokens_per_layer[:-1]]
    if hook is Hook.START:
        n_in = list(tokens_per_layer)
    elif hook is Hook.END:
        tokens_per_layer = n_in
    blocks = sum(block_macs(c, i, o) for c, i, o in zip(costs, n_in, tokens_per_layer))
    return adapter.stem_head_macs(model, input_tokens) + blocks


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    b, h, length, e = query_shape
    return 2 * b * h * length * key_shape[-2] * (e + value_shape[-1])


def counted_macs(fn: Callable[[], object]) -> int:
    """Multiply-accumulates of the matrix products, convolutions and attention ``fn`` runs, counted
    by torch's ``FlopCounterMode`` (for models no analytic count knows; CPU SDPA counted too)."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops() // 2
