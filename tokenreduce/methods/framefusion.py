"""``framefusion``: FrameFusion (Fu et al., "FrameFusion: Combining Similarity and Importance for Video
Token Reduction on Large Visual Language Models", ICCV 2025)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from tokenreduce.core import Selection, keep, rows_attention
from tokenreduce.core.frames import merge_into_previous_same_patch, patch_labels, previous_same_patch_similarity
from tokenreduce.methods.llm import ImageSpan, LLMContext, LLMMethod
from tokenreduce.registry import register_method
from tokenreduce.validate import as_int, as_real

REFERENCE_DEPTH = 28  # the reference's cost formula counts Qwen2-7B's 28 layers, whatever the model


@dataclass
class VideoState:
    """One video's FrameFusion state from one pruning layer to the next."""

    patch: Tensor  # [N] the patch each current token shows (-1: none, e.g. a newline token)
    sparsity: list[float] = field(default_factory=list)  # merged share at each merge layer (the reference's sparsity_list)
    merging: bool = True
    pruned: bool = False


@register_method
@dataclass
class FrameFusion(LLMMethod):
    """From LLM layer ``layer`` on, merge each video's tokens that repeat their patch in the previous
    frame, layer after layer while that pays, then keep once the most attended of the rest.

    From the reference (``thu-nics/FrameFusion`` at fbec1d2, ``framefusion/main.py``), per video of ``N``
    current tokens, at each layer while merging:

    - every token is compared (cosine, on the hidden states) with the previous token that still
      shows its patch (at first the same patch of the previous frame). The reference's budget
      ``u = _compute_pruning_ratio(sparsity, cost)`` caps the merge: the tokens with similarity
      ``>= similarity_lower_bound`` merge if their share ``r`` is below ``u`` (then ``r`` joins
      ``sparsity``, and merging stops after this layer if ``r < ratio_lower_bound``); otherwise the
      ``int(u * N)`` most similar merge and the video is done (no prune). A run of merged tokens joins
      the unmerged token before it at that patch as the plain average of the group (the reference's
      ``index_add_`` then ``/= (merge_nums + 1)``, so an earlier merge carries no extra weight), at
      that token's position.
    - at the layer after merging stopped, the video keeps the ``round(N * (1 - p))`` tokens (at least
      1), ``p = _compute_pruning_ratio(sparsity, cost)``, that the last ``query_tokens`` prompt tokens
      attended to most at the layer before (causal softmax over the whole row, mean over heads and
      those queries), in order, at their positions.

    ``_compute_pruning_ratio``: with ``s`` the product of ``1 - r`` over ``sparsity``, ``T`` the sum of
    those partial products and ``L = num_layers`` (the reference hard-codes 28, Qwen2-7B's depth),
    ``1 - (L * cost - T) / ((L - len(sparsity)) * s)``, or 0 when that is negative.

    Departures, for the engine's layer boundaries: the reference merges on layer 0's input and after
    the attention of each layer (before its MLP); here the merges and the prune act on the input of
    each layer from ``layer`` on (default 1, layer 0's output: the first point the engine offers),
    so its first two merge points become one and every stage sees the previous layer's MLP output. The
    reference's Qwen2-VL path averages the attention of the last 4 prompt tokens, its Qwen2 path
    (LLaVA-Video, MiniCPM-V, NVILA) the last one: ``query_tokens`` (default 1). Where the merges alone spend the
    budget the reference raises ("The cost is too small"); here the prune then keeps one token (and the
    formula counts at least one layer left after ``num_layers`` merge layers). A video a pre-LLM method
    already cut has lost its frame layout: nothing merges, the prune still runs.
    Choices it leaves open: each video of a batch merges and prunes on its own (the reference has one
    video and batch 1), so rows keep different counts and are re-padded; the capped top-k never takes
    a first-frame or newline token (the reference's could, merging it across patches); cosines are
    computed in float32.

    ``kept`` gives the counts of a video none of whose tokens merge: all of them, then the prune's.
    """

    name = "framefusion"
    paper = (
        "Fu et al., FrameFusion: Combining Similarity and Importance for Video Token Reduction on Large "
        "Visual Language Models, ICCV 2025"
    )
    modalities: ClassVar[frozenset[str]] = frozenset({"video"})
    scores = "queries"

    layer: int = 1  # the first layer whose input merges; every later layer may merge or prune
    cost: float = 0.3  # the share of the LLM's visual-token compute left (the reference's budget)
    similarity_lower_bound: float = 0.6  # S_th: merge tokens at least this similar to their previous frame
    ratio_lower_bound: float = 0.1  # stop merging after a layer that merged a smaller share
    num_layers: int = REFERENCE_DEPTH  # the depth the cost formula counts
    query_tokens: int = 1  # the last prompt tokens whose attention ranks the prune (reference: 1, Qwen2-VL 4)
    positions: str = "keep"

    def __post_init__(self) -> None:
        self.layer = as_int("layer", self.layer, 1)
        self.num_layers = as_int("num_layers", self.num_layers, 2)
        self.cost = as_real("cost", self.cost, 1 / self.num_layers, 1, low_open=True)
        self.similarity_lower_bound = as_real("similarity_lower_bound", self.similarity_lower_bound, -1)
        self.ratio_lower_bound = as_real("ratio_lower_bound", self.ratio_lower_bound, 0, 1)
        self.query_tokens = as_int("query_tokens", self.query_tokens, 1)
        self.check_positions()

    def prune_layers(self, depth: int) -> tuple[int, ...]:
        if not 1 <= self.layer <= depth - 2:
            raise ValueError(
                f"layer must be in [1, {depth - 2}] for an LLM of {depth} layers (FrameFusion merges there and "
                f"prunes at a later layer), got {self.layer}"
            )
        return tuple(range(self.layer, depth))

    def pruning_ratio(self, sparsity: list[float]) -> float:
        """The reference's ``_compute_pruning_ratio(sparsity, cost, num_layers)`` (1 where it raises)."""
        s, total = 1.0, 0.0
        for r in sparsity:
            s *= 1 - r
            total += s
        remain = self.num_layers * self.cost - total
        if remain < 0:
            return 1.0
        share = remain / (max(1, self.num_layers - len(sparsity)) * s)
        return 0.0 if share > 1 else 1 - share

    def pruned_count(self, tokens: int, sparsity: list[float]) -> int:
        """What the prune keeps of ``tokens`` after merges of the shares ``sparsity``."""
        return min(tokens, max(1, round(tokens * (1 - self.pruning_ratio(sparsity)))))

    def kept(self, tokens: int, stage: int) -> int:
        return tokens if stage == 0 else self.pruned_count(tokens, [0.0])

    def frame_layout(self, span: ImageSpan) -> tuple[int, int]:
        """``(frames, patches per frame)`` of a span at the first stage: a whole video's, else one frame
        (an image, or a video a pre-LLM method already cut: nothing merges, the prune still runs)."""
        if span.grid is None:
            return 1, span.length
        return span.frames, span.grid[0] * span.grid[1]

    def merge(self, tokens: Tensor, state: VideoState) -> Selection:
        """One merge layer on a video's current tokens ``[N, D]``; updates ``state``."""
        n = tokens.shape[0]
        cap = self.pruning_ratio(state.sparsity)  # the reference's sparsity_upper_bound
        similarity = previous_same_patch_similarity(tokens, state.patch)
        merged = similarity >= self.similarity_lower_bound
        share = int(merged.sum()) / n
        if share < cap:
            state.sparsity.append(share)
            state.merging = share >= self.ratio_lower_bound
        else:
            count = min(int(cap * n), int(similarity.isfinite().sum()))
            merged = torch.zeros_like(merged)
            merged[similarity.topk(count).indices] = True
            state.merging, state.pruned = False, True
        return merge_into_previous_same_patch(merged, state.patch)

    def select(self, ctx: LLMContext) -> list[Selection]:
        assert ctx.memory is not None
        out = []
        for i, span in enumerate(ctx.spans):
            tokens = ctx.hidden[span.row, span.start : span.start + span.length]
            if ctx.memory[i] is None:  # the first stage: the span is still the whole video
                ctx.memory[i] = VideoState(patch_labels(span.length, *self.frame_layout(span), device=tokens.device))
            state = ctx.memory[i]
            if state.merging:
                selection = self.merge(tokens, state)
            elif not state.pruned:
                assert ctx.queries is not None and ctx.keys is not None and ctx.scale is not None
                real = ctx.mask[span.row].nonzero().flatten()
                row = rows_attention(
                    ctx.queries[span.row], ctx.keys[span.row], real[-self.query_tokens :], ctx.mask[span.row], ctx.scale
                )
                scores = row[span.start : span.start + span.length]
                count = self.pruned_count(span.length, state.sparsity)
                selection = keep(scores.topk(count).indices.sort().values[None], span.length)
                state.pruned = True
            else:
                selection = keep(torch.arange(span.length, device=tokens.device)[None], span.length)
            state.patch = state.patch[selection.index[0]]
            out.append(selection)
        return out
