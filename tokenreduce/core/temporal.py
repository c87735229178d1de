"""Token selection across the frames of a video: pure tensor code."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def frame_pair_drop(features: Tensor, pairs: Sequence[tuple[int, int]], keep: int) -> Tensor:
    """Keep, of each frame ``later`` of ``pairs`` (``(later, earlier)``), the ``keep`` tokens least
    cosine-similar to the token at the same place in frame ``earlier``; every other frame stays whole.

    ``features [M, F, T, D]``: ``M`` videos of ``F`` frames of ``T`` tokens (the same places in every
    frame). Similarities compare the original features, in float32; ties go to the lower place. Each
    ``later`` frame appears at most once. Returns the kept tokens' indices into the frame-major
    ``F * T`` tokens, increasing: ``[M, F * T - len(pairs) * (T - keep)]``.
    """
    m, frames, tokens, _ = features.shape
    if not 0 <= keep <= tokens:
        raise ValueError(f"keep must be in [0, {tokens}] for frames of {tokens} tokens, got {keep}")
    kept = torch.ones(m, frames, tokens, dtype=torch.bool, device=features.device)
    for later, earlier in pairs:
        similarity = F.cosine_similarity(features[:, later].float(), features[:, earlier].float(), dim=-1)  # [M, T]
        order = similarity.argsort(dim=1, stable=True)  # least similar first, ties by place
        kept[:, later] = False
        kept[:, later].scatter_(1, order[:, :keep], True)
    count = frames * tokens - len(pairs) * (tokens - keep)
    return kept.flatten(1).nonzero()[:, 1].view(m, count)
