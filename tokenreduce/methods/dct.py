"""``dct``: low-pass filtering along the token axis (the DCT baseline of PiToMe's code, after He et al.,
"Fourier Transformer: Fast Long Range Modeling by Removing Sequence Redundancy with FFT Operator", Findings
of ACL 2023)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from tokenreduce.core import Selection, dct_lowpass, mix
from tokenreduce.methods.base import Budget, EncoderMethod, Hook, LayerContext
from tokenreduce.registry import register_method
from tokenreduce.validate import as_real


@register_method
@dataclass
class DCT(EncoderMethod):
    """Shorten the token sequence at the end of every block by keeping its lowest frequencies.

    After the MLP of every block, the ``T`` non-prefix tokens (in their current order) are transformed by
    the orthonormal DCT-II along the token axis, per channel; the first ``T' = ceil(T * ratio)``
    coefficients are kept and inverted by the orthonormal inverse DCT of length ``T'``, giving ``T'``
    tokens. Prefix tokens (CLS, distillation, registers) pass unchanged in front. The whole step is one
    fixed ``[T', T]`` matrix (:func:`~tokenreduce.core.dct_lowpass`), applied as a dense selection: every
    output mixes every input. Its rows are orthonormal, so its transpose is the exact least-squares
    inverse that dense heads use to restore the full grid (the low-pass part of the tokens).

    Reference: ``hchautran/PiToMe`` 550b5de, ``algo/dct`` (``dc_transform``), which reduces at every
    block, all blocks alike, with ``ratio`` a keep fraction. ``ratio=0.915`` (default) gives a DeiT-S
    cost of 2.96 GMACs by the analytic count (197 -> 72 tokens), the 2.9-3.0 class of PiToMe at 0.925
    and EViT at 0.7; the reference scripts sweep 0.9 (2.76), 0.925 (3.13), 0.95 and 0.975 without a
    default of their own. Every output mixes all inputs and the orthonormal scaling differs between the
    two lengths, so a constant sequence comes out scaled by ``sqrt(T / T')`` (as in the reference).

    Choices and departures:

    - Sizes: each output is credited with the original tokens of the inputs it takes the most of
      (every input's strongest output, the one its owners follow), so sizes add up to the input count
      and match the recorded sources; outputs have about ``T / T'`` each. The reference has no sizes (it
      mean-pools plainly); here size-weighted average pooling weighs outputs by these counts.
    - No proportional attention (the reference has none).
    - The reference casts every output to ``torch.half`` (under autocast, a rounding to fp16; in float32
      it would fail at the next block): not reproduced.
    - OpenToMe's copy takes a count ``r`` per block instead of a ratio: not offered.
    """

    name = "dct"
    paper = (
        "He et al., Fourier Transformer: Fast Long Range Modeling by Removing Sequence Redundancy with FFT Operator, "
        "Findings of ACL 2023"
    )
    hook: ClassVar[Hook] = Hook.END
    budget = Budget("ratio", 0.0, 1.0)

    ratio: float = 0.915  # fraction of the non-prefix tokens each block keeps (DeiT-S: 197 -> 72 tokens, 2.96 GMACs)

    def __post_init__(self) -> None:
        self.ratio = as_real("ratio", self.ratio, 0, 1, low_open=True)

    def schedule(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        n, out = num_tokens, []
        for _ in range(depth):
            n = num_prefix + math.ceil((n - num_prefix) * self.ratio)
            out.append(n)
        return out

    def select(self, x: Tensor, ctx: LayerContext) -> Selection | None:
        n, p = x.shape[1], ctx.num_prefix
        t, kept = n - p, ctx.num_out - p
        if kept == t:
            return None
        device = x.device
        low = dct_lowpass(t, kept, device)  # [T', T]
        matrix = torch.cat(
            [
                torch.cat([torch.eye(p, device=device), torch.zeros(p, t, device=device)], dim=1),
                torch.cat([torch.zeros(kept, p, device=device), low], dim=1),
            ],
            dim=0,
        )  # [num_out, N]: prefix tokens pass, the rest is low-passed
        # The map is the same for every image: work out owners and positions once, share them over the batch.
        one = mix(matrix[None], inverse=matrix.T[None])
        credit = torch.nn.functional.one_hot(one.slot, ctx.num_out).transpose(1, 2).float()  # inputs to their strongest output
        b = x.shape[0]
        return dataclasses.replace(
            one,
            slot=one.slot.expand(b, -1),
            index=one.index.expand(b, -1),
            matrix=matrix.expand(b, -1, -1),
            inverse=matrix.T.expand(b, -1, -1),
            size_matrix=credit.expand(b, -1, -1),
        )
