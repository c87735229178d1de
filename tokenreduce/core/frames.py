"""A video's tokens laid out frame-major (token ``t * patches + p`` is patch ``p`` of frame ``t``), compared
with and merged into the same patch of earlier frames (FrameFusion's similarity merge)."""

from __future__ import annotations

import torch
from torch import Tensor

from tokenreduce.core.selection import Selection


def _check_layout(n: int, frames: int, patches: int) -> int:
    body = frames * patches
    if frames < 1 or patches < 1 or body > n:
        raise ValueError(f"{frames} frames of {patches} patches do not fit in {n} tokens")
    return body


def previous_frame_similarity(x: Tensor, frames: int, patches: int) -> Tensor:
    """Cosine similarity of each token of ``x [N, C]`` to the token at its patch in the previous frame:
    ``[N]`` float32. The first frame's tokens, and any token after the ``frames * patches`` frame
    tokens (a trailing newline token), have no such token: ``-inf``."""
    body = _check_layout(x.shape[0], frames, patches)
    out = torch.full((x.shape[0],), float("-inf"), device=x.device)
    if frames > 1:
        grid = x[:body].float().view(frames, patches, -1)
        out[patches:body] = torch.nn.functional.cosine_similarity(grid[1:], grid[:-1], dim=-1).flatten()
    return out


def merge_into_previous_frames(merged: Tensor, frames: int, patches: int) -> Selection:
    """Each token where ``merged [N]`` (bool) is True joins the nearest earlier unmerged token at its
    patch (a run of merged frames goes to the frame before the run); every output is the plain mean of
    its group and takes the position of that unmerged token. Outputs: the unmerged tokens, in order.
    A one-row :class:`Selection` ``N -> N - merged.sum()``; first-frame tokens and tokens after the
    frames cannot merge (``ValueError``)."""
    body = _check_layout(merged.shape[0], frames, patches)
    if bool(merged[:patches].any()) or bool(merged[body:].any()):
        raise ValueError("only tokens of frames after the first can merge into an earlier frame")
    kept = ~merged
    slot = kept.long().cumsum(0) - 1  # the output of each unmerged token
    frame = torch.arange(frames, device=merged.device)[:, None].expand(frames, patches)
    head = torch.where(kept[:body].view(frames, patches), frame, -1).cummax(dim=0).values
    head = head * patches + torch.arange(patches, device=merged.device)
    slot[:body] = slot[head.flatten()]
    return Selection(slot[None], kept.nonzero().flatten()[None], mean=True)
