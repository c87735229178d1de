"""``visionzip``: VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision
Language Models", CVPR 2025)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenreduce.core import Selection, cls_attention, dominant_contextual
from tokenreduce.methods.visual import VisualContext, VisualMethod
from tokenreduce.registry import register_method
from tokenreduce.validate import as_int

DOMINANT, CONTEXTUAL = 54, 10  # the README's example; the paper's LLaVA-1.5 settings are 54+10, 108+20, 162+30


@register_method
@dataclass
class VisionZip(VisualMethod):
    """Dominant tokens by attention, contextual tokens by merging the rest, on the vision encoder's
    hidden states at the layer the VLM reads (before the projector).

    From the reference (``dvlab-research/VisionZip`` ``visionzip/clip_encoder.py`` at 3151f6d):
    1. Dominant: the class token plus the ``dominant - 1`` patches it attends to most at that layer
       (head-summed softmax row; the kept ones stay in position order).
    2. Contextual: among the other tokens, every ``len // contextual``-th is a target; each remaining
       token joins the target whose key (the layer's keys averaged over heads) is most cosine-similar;
       a contextual token is its target's hidden state plus the mean of the tokens that joined it.
    3. The LLM reads dominant then contextual tokens.

    Budget: ``dominant`` + ``contextual`` per image (default 54 + 10), or ``keep_ratio`` /
    ``keep_tokens`` split in the paper's 54:10 proportion. Choices the reference leaves open: on an
    encoder without a class token (SigLIP) the dominant score is the attention each patch receives,
    averaged over heads and all queries (the pseudo-CLS saliency of VisionZip's SigLIP ports), and all
    ``dominant`` tokens are patches; the class token's kept output takes the image's first position when
    ``positions="keep"``. On Qwen2-VL and Qwen2.5-VL (no class token; the patch merger is the projector)
    a token is a merged 2x2 group of patches: its score is the attention its four patches receive in
    the last vision block (over the whole image, also where that block attends within windows), its
    key the mean of theirs, and merging adds the groups' four concatenated patch states, which the
    merger then projects.

    AnyRes (LLaVA-NeXT, OneVision): the budget applies per crop (the base image and each crop), as
    the reference's ``encode_images_visionzip_multi``; the LLM reads the base image's tokens, then the
    crops' dominant patches in the image's row-major order, their class tokens, then their contextual
    tokens, with no newline tokens (``restore_image_features_sorted``).
    """

    name = "visionzip"
    paper = "Yang et al., VisionZip: Longer is Better but Not Necessary in Vision Language Models, CVPR 2025"
    space = "vision"
    needs_attention = True
    default_keep_ratio = None

    dominant: int | None = None
    contextual: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dominant is not None or self.contextual is not None:
            if self.keep_ratio is not None or self.keep_tokens is not None:
                raise ValueError("pass dominant/contextual or keep_ratio/keep_tokens, not both")
            self.dominant = as_int("dominant", DOMINANT if self.dominant is None else self.dominant, 1)
            self.contextual = as_int("contextual", CONTEXTUAL if self.contextual is None else self.contextual, 0)
        elif self.keep_ratio is None and self.keep_tokens is None:
            self.dominant, self.contextual = DOMINANT, CONTEXTUAL

    def has_own_budget(self) -> bool:
        return self.dominant is not None

    def split(self, total: int) -> tuple[int, int]:
        """``(dominant, contextual)`` for ``total`` kept tokens."""
        if self.dominant is not None:
            return self.dominant, self.contextual
        contextual = round(total * CONTEXTUAL / (DOMINANT + CONTEXTUAL))
        return total - contextual, contextual

    def num_kept(self, num_tokens: int, grid: tuple[int, int] | None) -> int:
        if self.dominant is None:
            return super().num_kept(num_tokens, grid)
        total = self.dominant + self.contextual
        if total > num_tokens:
            raise ValueError(f"dominant + contextual must be at most the {num_tokens} tokens of an image, got {total}")
        return total

    def summary_outputs(self, keep: int) -> int:
        return self.split(keep)[1]

    def select(self, ctx: VisualContext) -> Selection:
        x, p = ctx.features, ctx.num_prefix
        m, t = x.shape[:2]
        dominant, contextual = self.split(ctx.keep)
        if dominant < p:
            raise ValueError(f"dominant must be >= {p} (the class token is always dominant), got {dominant}")
        scores = cls_attention(ctx.q, ctx.k, ctx.scale)[:, 1:] if p else ctx.received()
        top = scores.topk(dominant - p, dim=1).indices + p
        picked = torch.cat([torch.arange(p, device=x.device).expand(m, -1), top], dim=1).sort(dim=1).values
        return dominant_contextual(picked, ctx.key_metric(), contextual)
