"""``framefusion``: FrameFusion (Fu et al., "FrameFusion: Combining Similarity and Importance for Video
Token Reduction on Large Visual Language Models", ICCV 2025)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from tokenreduce.core import Selection, keep
from tokenreduce.core.frames import merge_into_previous_frames, previous_frame_similarity
from tokenreduce.methods.llm import ImageSpan, LLMContext, LLMMethod
from tokenreduce.registry import register_method
from tokenreduce.validate import as_int, as_real

REFERENCE_DEPTH = 28  # the reference's cost formula counts Qwen2-7B's 28 layers, whatever the model


@register_method
@dataclass
class FrameFusion(LLMMethod):
    """Merge each video's tokens that repeat the same patch of the previous frame before LLM layer
    ``layer``, then keep the most attended of the rest before layer ``layer + 1``.

    From the reference (``thu-nics/FrameFusion`` at fbec1d2, ``framefusion/main.py``):

    - Merge: every token of frame ``t > 0`` is compared (cosine, on the hidden states) with the token
      at the same patch in frame ``t - 1``. With ``N`` video tokens and the budget cap
      ``u = 1 - cost``, the tokens with similarity ``>= similarity_lower_bound`` merge if they are
      fewer than ``u * N``; otherwise the ``int(u * N)`` most similar merge. A run of merged frames
      joins the unmerged token before it at that patch, as the plain average of the group (the
      reference's ``index_add_`` then ``/= (merge_nums + 1)``), at that token's position.
    - Prune: the pruning ratio ``p`` is the reference's ``_compute_pruning_ratio([r], cost)`` for the
      merged share ``r = merged / N``: with ``s = 1 - r``, ``p = 1 - (L * cost - s) / ((L - 1) * s)``
      (0 when that is negative), ``L = num_layers`` (the reference hard-codes 28). The video keeps the
      ``round((N - merged) * (1 - p))`` tokens (at least 1) that the last prompt token attends to most
      at layer ``layer`` (softmax over the whole row, mean over heads), in order, at their positions.

    Departures, for the engine's fixed pruning layers: the reference merges on layer 0's input and
    again after the attention of each following layer while the merged share stays
    ``>= ratio_lower_bound`` (0.1), then prunes after the attention of the next layer. Here the merge
    runs once, on the input of ``layer`` (default 1, layer 0's output: the first point the engine
    offers), and the prune on the input of ``layer + 1``, so ``ratio_lower_bound`` has no role and
    there is no such argument. When the cap binds the reference skips the prune; here it still runs
    with the ratio above, which then drops at most one token. The reference's Qwen2-VL path averages
    the attention of the last 4 prompt tokens, its Qwen2 path (LLaVA-Video, MiniCPM-V, NVILA) the last
    one: here the last one. Choices it leaves open: each video of a batch row merges and prunes on its
    own (the reference has one video and batch 1); first-frame tokens and a trailing newline token
    never merge (the reference's top-k could pick a first-frame token and merge it across patches);
    the cosine is computed in float32.

    The counts depend on the content (how many tokens merge): rows are re-padded after each stage.
    ``kept`` gives the most a video can keep.
    """

    name = "framefusion"
    paper = (
        "Fu et al., FrameFusion: Combining Similarity and Importance for Video Token Reduction on Large "
        "Visual Language Models, ICCV 2025"
    )
    modalities: ClassVar[frozenset[str]] = frozenset({"video"})

    layer: int = 1  # merge before this layer, prune before the next one
    cost: float = 0.3  # the share of the LLM's visual-token compute left (the reference's budget)
    similarity_lower_bound: float = 0.6  # S_th: merge tokens at least this similar to the previous frame
    num_layers: int = REFERENCE_DEPTH  # the depth the cost formula counts
    positions: str = "keep"

    def __post_init__(self) -> None:
        self.layer = as_int("layer", self.layer, 1)
        self.num_layers = as_int("num_layers", self.num_layers, 2)
        self.cost = as_real("cost", self.cost, 1 / self.num_layers, 1, low_open=True)
        self.similarity_lower_bound = as_real("similarity_lower_bound", self.similarity_lower_bound, -1)
        self.check_positions()

    def prune_layers(self, depth: int) -> tuple[int, ...]:
        if not 1 <= self.layer <= depth - 2:
            raise ValueError(
                f"layer must be in [1, {depth - 2}] for an LLM of {depth} layers (FrameFusion prunes before layer + 1), "
                f"got {self.layer}"
            )
        return (self.layer, self.layer + 1)

    def merge_cap(self, tokens: int) -> int:
        """The most of ``tokens`` video tokens that may merge: ``int((1 - cost) * tokens)``."""
        return int((1 - self.cost) * tokens)

    def pruned_count(self, tokens: int, merged: int) -> int:
        """Tokens a video of ``tokens`` keeps after the prune, when ``merged`` of them merged."""
        s = 1 - merged / tokens
        remain = (self.num_layers * self.cost - s) / ((self.num_layers - 1) * s)
        ratio = 0.0 if remain > 1 else 1 - remain
        return min(tokens - merged, max(1, round((tokens - merged) * (1 - ratio))))

    def kept(self, tokens: int, stage: int) -> int:
        # at most: nothing merges at stage 0; the prune keeps the most when the merge takes its cap
        return tokens if stage == 0 else self.pruned_count(tokens, self.merge_cap(tokens))

    def frame_layout(self, span: ImageSpan) -> tuple[int, int]:
        """``(frames, patches per frame)`` of a whole video span (one frame for an image)."""
        patches = span.grid[0] * span.grid[1] if span.grid is not None else span.length // span.frames
        return span.frames, patches

    def merge(self, tokens: torch.Tensor, span: ImageSpan) -> Selection:
        """The merge of one video's tokens ``[N, D]`` (see the class docstring)."""
        frames, patches = self.frame_layout(span)
        similarity = previous_frame_similarity(tokens, frames, patches)
        n = tokens.shape[0]
        merged = similarity >= self.similarity_lower_bound
        if int(merged.sum()) / n >= 1 - self.cost:  # the reference's `above_k_ratio < sparsity_upper_bound` fails
            count = min(self.merge_cap(n), (frames - 1) * patches)
            merged = torch.zeros_like(merged)
            merged[similarity.topk(count).indices] = True
        return merge_into_previous_frames(merged, frames, patches)

    def select(self, ctx: LLMContext) -> list[Selection]:
        out = []
        for span, inputs in zip(ctx.spans, ctx.inputs):
            if ctx.stage == 0:
                out.append(self.merge(ctx.hidden[span.row, span.start : span.start + span.length], span))
                continue
            assert ctx.attention is not None
            scores = ctx.attention[span.row, span.start : span.start + span.length]
            count = self.pruned_count(inputs, inputs - span.length)
            out.append(keep(scores.topk(count).indices.sort().values[None], span.length))
        return out
