"""Transforms along the token axis: the orthonormal DCT-II and the low-pass resampling built on it (the
DCT token reduction baseline of PiToMe's code, after He et al., "Fourier Transformer", ACL Findings 2023)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def dct_matrix(n: int, device: torch.device | str | None = None) -> Tensor:
    """The orthonormal DCT-II ``[n, n]`` (float32): ``X = D @ x`` along a length-``n`` axis, ``D @ D.T = I``.

    ``D[k, i] = sqrt(2 / n) * c_k * cos(pi * (2i + 1) * k / (2n))`` with ``c_0 = 1 / sqrt(2)``, else 1 (the
    ``norm='ortho'`` DCT of SciPy and of the reference). The phase is reduced modulo ``4n`` in integers
    first, so the float32 cosines stay accurate for long sequences.
    """
    k = torch.arange(n, device=device)[:, None]
    i = torch.arange(n, device=device)[None, :]
    phase = ((2 * i + 1) * k) % (4 * n)
    d = torch.cos(phase.float() * (math.pi / (2 * n))) * math.sqrt(2.0 / n)
    return torch.cat([d[:1] * math.sqrt(0.5), d[1:]], dim=0)


def dct_lowpass(n: int, m: int, device: torch.device | str | None = None) -> Tensor:
    """``[m, n]`` (float32): the length-``n`` signal's first ``m`` DCT-II coefficients, inverted at length
    ``m`` (orthonormal transforms at both lengths), as one matrix: ``y = L @ x``, ``1 <= m <= n``.

    Its rows are orthonormal (``L @ L.T = I``), so ``L.T`` maps the ``m`` outputs back to the closest
    length-``n`` signal (the low-pass part of ``x``). A constant signal ``c`` comes out as
    ``c * sqrt(n / m)``: the orthonormal scaling of the two lengths differs (the reference does the same).
    """
    if not 1 <= m <= n:
        raise ValueError(f"m must be in [1, {n}] for a length-{n} signal, got {m}")
    return dct_matrix(m, device).T @ dct_matrix(n, device)[:m]
