"""``pitome``: Protect Informative Tokens before Merging (Tran et al., "Accelerating Transformers with
Spectrum-Preserving Token Merging", NeurIPS 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenreduce.core import Selection, bipartite_merge
from tokenreduce.methods.base import Budget, EncoderMethod, LayerContext
from tokenreduce.registry import register_method
from tokenreduce.validate import as_bool, as_real

VARIANT_ORDERS = ("deit", "mae")


@register_method
@dataclass
class PiToMe(EncoderMethod):
    """Merge the high-energy (redundant) tokens of every block, protecting the low-energy (isolated) ones.

    In block ``l`` of ``L``, after attention, on the ``T`` non-prefix tokens: ``r = floor(T - T * ratio)``
    (the reference's count rule, with T the tokens after the prefix, at every block alike). The metric is
    the keys averaged over heads; with ``S`` their cosine similarities (diagonal included), a token's
    energy is ``mean_j ELU(S_ij - m_l)`` with the margin ``m_l = margin * (1 - l / L)`` (0.75, 0.6875,
    ..., 0.0625 for 12 blocks). Tokens are sorted by energy, descending, and merged by one of two rules:

    - "pitome" (the paper's rule): the ``2r`` highest-energy tokens are mergeable, the rest protected;
      alternately into A and B in energy order, and **every** A token merges into its most similar B token.
      Outputs ``[prefix, protected (energy order), B (energy order)]``.
    - "bipartite" (the reference's ``pitome_bsm``): all ``T`` tokens alternately into A and B in energy
      order, then ToMe's ``r`` strongest edges. Outputs ``[prefix, unmerged A (by edge), B (energy order)]``.

    Merges are size-weighted means (sizes add). Defaults are those of the reference (``hchautran/PiToMe``
    550b5de, ``algo/pitome``) for DeiT: ``ratio=0.925`` (its DeiT-S setting: 197 -> 82 tokens, 2.99 GMACs
    by the analytic count), ``margin=0.75``, no proportional attention (its block calls attention without
    sizes), the two rules placed as its DeiT patch places them: ``variant_order="deit"`` runs the
    bipartite rule in the first ``ceil(L / 2)`` blocks and the pitome rule after. Its MAE patch does the
    reverse (``variant_order="mae"``); the code contradicts itself and the paper does not say.

    Choices the reference leaves open and departures:

    - Every prefix token (CLS, distillation, registers) is protected and stays in front; the reference
      protects only index 0 (a distillation token or registers are merged like patches there).
    - ``ratio`` must be in [0.5, 1]: then ``r <= T // 2`` always holds, as both rules need (the reference
      has no check and fails below 0.5).
    - Where ``r = 0`` the tokens are left as they are; the reference still reorders them by energy.
    - Energy-order and edge-order ties fall in no fixed order (the reference's unstable argsort too).
    - The similarity and the energy are computed in float32, whatever the model's dtype.
    - ELU with ``alpha = 1`` (the reference's default; no option).
    """

    name = "pitome"
    paper = "Tran et al., Accelerating Transformers with Spectrum-Preserving Token Merging, NeurIPS 2024"
    budget = Budget("ratio", 0.5, 1.0)

    ratio: float = 0.925  # fraction of the non-prefix tokens each block keeps (DeiT-S: 197 -> 82 tokens)
    margin: float = 0.75  # energy margin at the first block, decreasing linearly to 0 after the last
    variant_order: str = "deit"  # "deit": bipartite rule in the first ceil(L/2) blocks, pitome rule after; "mae": reverse
    prop_attn: bool = False  # weight attention by log(token size); the reference does not

    def __post_init__(self) -> None:
        self.ratio = as_real("ratio", self.ratio, 0.5, 1)
        self.margin = as_real("margin", self.margin, 0, 1)
        self.prop_attn = as_bool("prop_attn", self.prop_attn)
        if self.variant_order not in VARIANT_ORDERS:
            raise ValueError(f"variant_order must be one of {VARIANT_ORDERS}, got {self.variant_order!r}")

    def merges(self, tokens: int) -> int:
        """Tokens merged away in one block with ``tokens`` non-prefix tokens: ``floor(T - T * ratio)``."""
        return math.floor(tokens - tokens * self.ratio)

    def schedule(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        n, out = num_tokens, []
        for _ in range(depth):
            n -= self.merges(n - num_prefix)
            out.append(n)
        return out

    def uses_bipartite_rule(self, layer: int, depth: int) -> bool:
        """Whether block ``layer`` merges by ToMe's top-r edges (else every mergeable A token merges)."""
        early = layer < math.ceil(depth / 2)
        return early if self.variant_order == "deit" else not early

    def select(self, x: Tensor, ctx: LayerContext) -> Selection | None:
        n, p = x.shape[1], ctx.num_prefix
        r = n - ctx.num_out
        if r == 0:
            return None
        with torch.no_grad():
            unit = F.normalize(ctx.metric()[:, p:].float(), dim=-1)
            sim = unit @ unit.transpose(-1, -2)  # [B, T, T]
            margin = self.margin * (1 - ctx.layer / ctx.depth)
            order = F.elu(sim - margin).mean(dim=-1).argsort(dim=-1, descending=True)  # by energy, highest first
            b, t = order.shape
            prefix = torch.arange(p, device=x.device).expand(b, -1)
            if self.uses_bipartite_rule(ctx.layer, ctx.depth):
                a_idx, b_idx, keep_idx = order[:, ::2], order[:, 1::2], prefix
            else:
                a_idx, b_idx = order[:, : 2 * r : 2], order[:, 1 : 2 * r : 2]
                keep_idx = torch.cat([prefix, order[:, 2 * r :] + p], dim=1)
            scores = sim.gather(1, a_idx[..., None].expand(-1, -1, t)).gather(2, b_idx[:, None].expand(-1, a_idx.shape[1], -1))
        return bipartite_merge(scores, a_idx + p, b_idx + p, r, n, keep_idx, None if ctx.size is None else ctx.size[..., 0])
