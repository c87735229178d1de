"""A video's tokens labelled by the patch they show (token ``t * patches + p`` of a frame-major video is
patch ``p``), compared with and merged into the previous token of the same patch (FrameFusion's
similarity merge). Labels follow the tokens through merges, so later merges pair each token with the
nearest earlier frame that still has its own token at that patch."""

from __future__ import annotations

import torch
from torch import Tensor

from tokenreduce.core.selection import Selection


def patch_labels(tokens: int, frames: int, patches: int, device: torch.device | None = None) -> Tensor:
    """``[tokens]`` long: the patch of each token of ``frames`` frame-major frames of ``patches`` patches,
    ``-1`` for the tokens after them (a trailing newline token)."""
    body = frames * patches
    if frames < 1 or patches < 1 or body > tokens:
        raise ValueError(f"{frames} frames of {patches} patches do not fit in {tokens} tokens")
    labels = torch.full((tokens,), -1, dtype=torch.long, device=device)
    labels[:body] = torch.arange(body, device=device) % patches
    return labels


def previous_same_patch(patch: Tensor) -> Tensor:
    """For each token of ``patch [N]`` (labels, ``-1`` for none), the index of the last earlier token with
    the same label: ``[N]`` long, ``-1`` for a label's first token and for unlabelled tokens."""
    n = patch.shape[0]
    position = torch.arange(n, device=patch.device)
    order = torch.where(patch >= 0, patch * n + position, position - n).argsort()  # by label, then position
    label = patch[order]
    same = (label[1:] == label[:-1]) & (label[1:] >= 0)
    out = torch.full_like(patch, -1)
    out[order[1:][same]] = order[:-1][same]
    return out


def previous_same_patch_similarity(x: Tensor, patch: Tensor) -> Tensor:
    """Cosine similarity of each token of ``x [N, C]`` to the previous token with its label in ``patch
    [N]``: ``[N]`` float32, ``-inf`` where there is none."""
    previous = previous_same_patch(patch)
    has = previous >= 0
    out = torch.full((x.shape[0],), float("-inf"), device=x.device)
    out[has] = torch.nn.functional.cosine_similarity(x[has].float(), x[previous[has]].float(), dim=-1)
    return out


def merge_into_previous_same_patch(merged: Tensor, patch: Tensor) -> Selection:
    """Each token where ``merged [N]`` (bool) is True joins the nearest earlier unmerged token with its
    label in ``patch [N]`` (a run of merged tokens goes to the token before the run); every output is the
    plain mean of its group and takes the position of that unmerged token. Outputs: the unmerged tokens,
    in order. A one-row :class:`Selection` ``N -> N - merged.sum()``; a token with no earlier token of its
    label cannot merge (``ValueError``)."""
    n = merged.shape[0]
    if bool((merged & (previous_same_patch(patch) < 0)).any()):
        raise ValueError("only a token with an earlier token of its patch can merge")
    kept = ~merged
    slot = kept.long().cumsum(0) - 1  # the output of each unmerged token
    position = torch.arange(n, device=merged.device)
    order = torch.where(patch >= 0, patch * n + position, position - n).argsort()
    # in label order every label's run starts with an unmerged token: the last unmerged one so far is the head
    head = order[torch.where(kept[order], position, -1).cummax(dim=0).values]
    slot[order] = slot[head]
    return Selection(slot[None], kept.nonzero().flatten()[None], mean=True)
