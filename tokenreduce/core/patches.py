"""The raw pixels behind each patch token, and picking whole patches of an image by token."""

from __future__ import annotations

import torch
from torch import Tensor


def patchify(image: Tensor, patch_size: tuple[int, int], channels_last: bool = False) -> Tensor:
    """``image [B, C, H, W] -> [B, P, C * ph * pw]``: the pixels each patch token of a ViT sees, for
    ``patch_size = (ph, pw)``, patches in row-major order (the order of the patch tokens) and the
    values of one patch channel-major (``c, y, x``), or ``y, x, c`` with ``channels_last`` (the rows a
    DiT's output projection un-patchifies). Rows and columns past the last whole patch are left out, as
    a stride-``patch_size`` convolution leaves them out."""
    b, c, h, w = image.shape
    ph, pw = patch_size
    rows, cols = h // ph, w // pw
    x = image[:, :, : rows * ph, : cols * pw].reshape(b, c, rows, ph, cols, pw)
    order = (0, 2, 4, 3, 5, 1) if channels_last else (0, 2, 4, 1, 3, 5)
    return x.permute(*order).reshape(b, rows * cols, c * ph * pw)


def tubelets_as_image(video: Tensor, frames: int, patch_size: tuple[int, int]) -> Tensor:
    """``video [B, C, T, H, W] -> [B, C * frames, (T // frames) * rows * ph, cols * pw]``: a video embedded
    in tubelets of ``frames x ph x pw`` pixels (a stride-equals-kernel ``Conv3d``) laid out as one tall
    image whose ``(ph, pw)`` patches, in row-major order, are the tubelets in the order of the tokens
    (time, row, column): the time slices stacked top to bottom, a tubelet's frames as channels, what the
    convolution leaves out (trailing frames, rows, columns) left out."""
    b, c, t, h, w = video.shape
    (ph, pw), slices = patch_size, t // frames
    rows, cols = h // ph, w // pw
    x = video[:, :, : slices * frames, : rows * ph, : cols * pw].reshape(b, c, slices, frames, rows * ph, cols * pw)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, c * frames, slices * rows * ph, cols * pw)


def patch_where(mask: Tensor, a: Tensor, b: Tensor, patch_size: tuple[int, int]) -> Tensor:
    """``a`` on the patches whose token ``mask [B, P]`` (bool, row-major) marks, ``b`` on the others:
    ``a``, ``b`` are ``[B, C, H, W]`` images made of whole ``(ph, pw)`` patches."""
    n, c, h, w = a.shape
    ph, pw = patch_size
    shape = (n, c, h // ph, ph, w // pw, pw)
    keep = mask.view(n, 1, h // ph, 1, w // pw, 1)
    return torch.where(keep, a.reshape(shape), b.reshape(shape)).reshape(a.shape)
