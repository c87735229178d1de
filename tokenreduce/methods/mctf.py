"""``mctf``: Multi-Criteria Token Fusion with one-step-ahead attention (Lee et al., CVPR 2024), used
training-free."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tokenreduce.core import Selection, alternate_merge, merge_attention
from tokenreduce.methods.base import Budget, EncoderMethod, Hook, LayerContext, as_layers, layers_for_depth
from tokenreduce.registry import register_method
from tokenreduce.validate import _is_bool, _unwrap_scalar, as_bool, as_int, as_real

POOLING = ("attention", "size", "mean")
MIN_TOKENS = 10  # the reference never merges below 10 tokens


@register_method
@dataclass
class MCTF(EncoderMethod):
    """Merge ``r`` tokens per block by bipartite matching on three criteria, at the block start, with the
    block's own attention taken one step ahead.

    At the start of each active block (the reference's ``mlvlab/MCTF`` at 2004da0, ``utils/mctf.py``,
    ``models/modules/blocks.py``), from the attention of the block's own queries and keys on its input
    (proportional attention: ``+log(size)``):

    1. ``r`` = ``r`` if an integer, ``int((N - P) * r)`` if a fraction; at most ``N - 10`` (the reference
       never goes below 10 tokens) and ``(N - P) // 2``, P the prefix tokens. These caps are the
       reference's own count rule, not a silent change of the config: :meth:`schedule` shows them (on a
       24-block ViT-L, ``r=16`` in 23 blocks stops at 10 tokens). The reference applies the 10-token
       floor to a fraction before converting it, where it never binds; here it applies after, to both.
    2. Scores between A (even positions) and B (odd positions) tokens, on the hidden states ``x`` (not
       the keys): ``((cos + 1) / 2)^(1/tau_sim)``, times ``(w_a * w_b)^(1/tau_info)`` with ``w = (1/a) /
       max(1/a)`` and ``a`` the attention each token receives (averaged over heads and queries), times
       ``(s_a * s_b)^(1/tau_size)`` with ``s = (1/size) / max(1/size)``. A tau of 0 turns its criterion off.
    3. Bidirectional matching (``bidirectional=True``): ``r // 2`` A tokens merge into their best B
       token, then ``r - r // 2`` B tokens (merged ones included) into their best still-unmerged A token,
       on the same scores. Outputs ``[prefix, A, B]`` (:func:`~tokenreduce.core.bipartite_merge`).
    4. Pooling: each merged token is the mean of its group weighted by ``a * size`` (``"attention"``,
       the reference's pooling type 1), by ``size`` (``"size"``, type 0, ToMe's) or plain (``"mean"``,
       type 3); sizes add. The reference's max pooling (type 2) is not linear and not offered.

    ``one_step_ahead`` (the reference's flag of the same name; the hook placement follows from it, so
    ``hook``, ``start_qkv`` and ``edits_attention`` are properties of the instance instead of class
    constants):

    - ``1`` (default, the paper's): the block's attention is not recomputed: its map (taken before the
      merge) is merged too (:func:`~tokenreduce.core.merge_attention`: summed over merged keys, pooled
      over merged queries with the same weights) and applied to values projected from the merged
      tokens. Every block then runs eager attention (the map is needed); blocks that merge nothing use
      their own map. The queries and keys projected from the merged tokens are not used.
    - ``2``: merge at the block start, then attention recomputed on the merged tokens (fused SDPA).
    - ``0``: merge at the block end, after the MLP, with this block's attention (no look-ahead).

    Defaults = the reference's DeiT-S evaluation config (``run/eval_deit_s_mctf.sh``: ``mctf_type
    [16,0,0,1,1,1,20,40,1,1,0]``, ``activate_layer [1..11]``): ``r=16`` in every block but the first
    (``layers=None``; the reference's blocks 1-11 of 12 at any depth), one step ahead, tau 1/20/40,
    bidirectional, attention-and-size pooling, proportional attention. DeiT-S: 197 -> 181 -> ... -> 21
    tokens. MCTF-Fast is ``r=0.35, layers=(3, 6, 9)``.

    Choices the reference leaves open, and departures:

    - Prefix tokens: the reference protects the first ``num_protected`` rows of A (the CLS token; its
      DeiT sets the distillation-token count to 0) and lets its backward step merge any B token. Here
      every prefix token (CLS, distillation, registers) is masked as a row and a column in both steps
      and stays in front, in order; with only a CLS token this is the reference exactly.
    - ``r=0`` is the unpatched model, bit for bit: nothing is projected ahead and no attention map is
      edited. With ``r > 0`` and one step ahead, blocks that merge nothing use their own attention map
      (eager, equal to the fused one to float tolerance), and the merged map is the paper's approximation
      of the merged tokens' attention: not what recomputing attention gives (``one_step_ahead=2`` does).
    - Scores, weights and the merged map are computed in float32 whatever the model's dtype.
    - Compute: one step ahead projects q/k/v at the start of every block (also of blocks that do not
      merge, e.g. block 0) and again on the merged tokens, of which only v is used.
    """

    name = "mctf"
    paper = "Lee et al., Multi-criteria Token Fusion with One-step-ahead Attention for Efficient Vision Transformers, CVPR 2024"
    budget = Budget("r", 0.0, 0.5, increasing=False)  # as a fraction: the same knob at any resolution

    r: int | float = 16  # tokens merged per active block, or a fraction (< 1) of its non-prefix tokens
    layers: Sequence[int] | None = None  # active blocks; None: every block but the first
    one_step_ahead: int = 1  # 1: reuse the merged attention map; 2: merge, then recompute; 0: merge after the MLP
    tau_sim: float = 1.0  # temperature of the similarity criterion (0: off)
    tau_info: float = 20.0  # temperature of the informativeness criterion (0: off)
    tau_size: float = 40.0  # temperature of the size criterion (0: off)
    bidirectional: bool = True  # two-way matching (False: ToMe's one-way matching on these scores)
    pooling: str = "attention"  # merge weights: "attention" (received attention x size), "size" or "mean"
    prop_attn: bool = True  # add log(size) to the attention logits

    def __post_init__(self) -> None:
        r = _unwrap_scalar(self.r)
        if isinstance(r, numbers.Real) and not isinstance(r, numbers.Integral) and not _is_bool(r):
            self.r = as_real("r (a fraction of the non-prefix tokens; or an integer >= 0)", r, 0, 1, high_open=True)
        else:
            self.r = as_int("r (or a fraction in [0, 1))", r, 0)
        self.layers = as_layers(self.layers)
        self.one_step_ahead = as_int("one_step_ahead", self.one_step_ahead, 0, 2)
        for name in ("tau_sim", "tau_info", "tau_size"):
            setattr(self, name, as_real(name, getattr(self, name), 0))
        self.bidirectional = as_bool("bidirectional", self.bidirectional)
        self.prop_attn = as_bool("prop_attn", self.prop_attn)
        if self.pooling not in POOLING:
            raise ValueError(f"pooling must be one of {POOLING}, got {self.pooling!r}")

    @property
    def hook(self) -> Hook:  # type: ignore[override]
        return Hook.END if self.one_step_ahead == 0 else Hook.START

    @property
    def start_qkv(self) -> bool:  # type: ignore[override]
        return self.one_step_ahead != 0 and self.r > 0

    @property
    def edits_attention(self) -> bool:  # type: ignore[override]
        return self.one_step_ahead == 1 and self.r > 0  # r=0 keeps every block's fused attention

    def merges(self, num_tokens: int, num_prefix: int) -> int:
        """Tokens an active block merges when ``num_tokens`` enter it (the reference's rule)."""
        r = int((num_tokens - num_prefix) * self.r) if isinstance(self.r, float) else self.r
        return max(0, min(r, num_tokens - MIN_TOKENS, (num_tokens - num_prefix) // 2))

    def schedule(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        active = set(range(1, depth) if self.layers is None else layers_for_depth(self.layers, depth))
        n, out = num_tokens, []
        for layer in range(depth):
            if layer in active:
                n -= self.merges(n, num_prefix)
            out.append(n)
        return out

    def select(self, x: Tensor, ctx: LayerContext) -> Selection | None:
        r = x.shape[1] - ctx.num_out
        if r == 0:
            return None
        probs = ctx.attention() if self.edits_attention else None
        received = ctx.received() if probs is None else probs.mean(dim=(1, 2))  # [B, N]
        size = ctx.sizes(x)[..., 0]
        scores = multi_criteria_scores(x, received, size, self.tau_sim, self.tau_info, self.tau_size)
        weight = {"attention": received * size, "size": size, "mean": torch.ones_like(size)}[self.pooling]
        selection = alternate_merge(scores, r, ctx.num_prefix, weight, bidirectional=self.bidirectional)
        if probs is not None:
            ctx.carry = merge_attention(probs, selection)  # this block's attention, in attend()
        return selection

    def attend(self, ctx: LayerContext) -> Tensor:
        merged, ctx.carry = ctx.carry, None
        return ctx.attention() if merged is None else merged


def multi_criteria_scores(x: Tensor, received: Tensor, size: Tensor, tau_sim: float, tau_info: float, tau_size: float) -> Tensor:
    """MCTF's A x B edge scores ``[B, N_A, N_B]`` (A even positions, B odd) for ``x [B, N, C]``:
    similarity ``((cos + 1) / 2)^(1/tau_sim)`` times informativeness ``(w_a * w_b)^(1/tau_info)``,
    ``w = (1/a) / max(1/a)`` for the attention each token receives ``received [B, N]``, times size
    ``(s_a * s_b)^(1/tau_size)``, ``s = (1/size) / max(1/size)`` for ``size [B, N]``. A tau of 0 turns
    its factor off. float32."""
    unit = x.float() / x.float().norm(dim=-1, keepdim=True)
    scores = torch.ones(x.shape[0], (x.shape[1] + 1) // 2, x.shape[1] // 2, device=x.device)
    if tau_sim:
        scores = (((unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2)) + 1) / 2) ** (1 / tau_sim)
    for tau, value in ((tau_info, received), (tau_size, size)):
        if tau:
            inverse = 1 / value.float()
            inverse = inverse / inverse.amax(dim=1, keepdim=True)
            scores = scores * (inverse[:, ::2, None] * inverse[:, None, 1::2]) ** (1 / tau)
    return scores
