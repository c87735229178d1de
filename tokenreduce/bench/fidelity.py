"""How close a reduced model's output is to the unreduced one: PSNR and SSIM on tensors."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def psnr(reference: Tensor, output: Tensor, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB of ``output`` against ``reference`` (any equal shapes), for
    values spanning ``data_range``; ``inf`` when they are equal."""
    mse = (output.double() - reference.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    """``[size, size]`` float64 Gaussian weights summing to 1."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(reference: Tensor, output: Tensor, data_range: float, window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al., 2004) of ``output`` against ``reference``, both
    ``[B, C, H, W]``: each channel on its own with the standard 11x11 Gaussian window (sigma 1.5),
    ``K1 = 0.01``, ``K2 = 0.03``, population statistics, over the positions where the window fits
    whole; the mean over positions, channels and batch. A window larger than the image shrinks to its
    smaller side (made odd). Computed in float64."""
    if reference.shape != output.shape or reference.dim() != 4:
        raise ValueError(
            f"ssim needs two [B, C, H, W] tensors of one shape, got {tuple(reference.shape)} and {tuple(output.shape)}"
        )
    b, c, h, w = reference.shape
    size = min(window, h, w)
    size -= 1 - size % 2
    kernel = gaussian_window(size, sigma).to(reference.device)[None, None]
    x = reference.double().reshape(b * c, 1, h, w)
    y = output.double().reshape(b * c, 1, h, w)

    def mean(t: Tensor) -> Tensor:
        return F.conv2d(t, kernel)

    mu_x, mu_y = mean(x), mean(y)
    var_x = mean(x * x) - mu_x**2
    var_y = mean(y * y) - mu_y**2
    cov = mean(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return value.mean().item()
