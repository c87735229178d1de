"""``vwt``: the Visual-Word Tokenizer's intra-image variant (Gee et al., "Visual-Word Tokenizer: Beyond Fixed
Sets of Tokens in Vision Transformers", TMLR 2025, arXiv 2411.15397)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tokenreduce.core import Selection, keep, top_k_positions
from tokenreduce.methods.base import Budget, EncoderMethod, Hook, LayerContext
from tokenreduce.registry import register_method
from tokenreduce.validate import as_int, as_real

# The paper keeps top_k = N - drop patches; its drop count for ViT could not be retrieved (see the docstring).
DEFAULT_KEEP_RATIO = 0.5


@register_method
@dataclass
class VWT(EncoderMethod):
    """Drop the patches whose raw pixels vary least before the first block (the paper's intra-image
    variant): each patch is scored by the variance of its ``3 * p * p`` pixel values, the ``top_k``
    highest-variance patches are kept in their spatial order, behind the untouched prefix tokens (CLS,
    registers), and the encoder runs on those. The kept tokens already carry their position embeddings.

    Give ``keep_ratio`` (the fraction of patches kept, ``top_k = ceil(keep_ratio * P)``, resolution-free) or
    ``drop`` (the paper's form: ``top_k = P - drop``), not both; with neither, ``keep_ratio=0.5``. The paper's
    own drop count for ViT is not in this implementation's sources (the specification gives only the
    ``top_k = N - drop`` form; the paper text could not be retrieved and the reference code is GPL-3.0, which
    this library does not read): 0.5 is a placeholder default, to be checked.

    Choices the paper leaves open or this implementation makes:

    - The pixels are the patch embedding's input (the model's normalised ``pixel_values``, after timm's
      dynamic padding), captured by the adapter; a forward on ready-made tokens raises.
    - The variance pools the three channels (one variance over ``3 * p * p`` values); its Bessel correction
      does not matter, as every patch has the same count and only the ranking is used.
    - Equal variances (e.g. flat patches) go to the lower patch index, so the choice is the
      same on every device.
    - Dense heads get every dropped patch from the nearest kept patch (:meth:`Record.restore`); the paper's
      ``decode()`` belongs to its inter-image variant.

    The inter-image variant (a k-means vocabulary of visual words, patches within a cosine threshold of one
    word averaged into one token) gives each image its own token count, which the schedule-from-shape
    contract does not allow; it is not implemented.
    """

    name = "vwt"
    paper = "Gee et al., Visual-Word Tokenizer: Beyond Fixed Sets of Tokens in Vision Transformers, TMLR 2025"
    hook = Hook.START
    needs_image = True
    budget = Budget("keep_ratio", 0.0, 1.0)

    keep_ratio: float | None = None  # fraction of the patch tokens kept
    drop: int | None = None  # patch tokens dropped (the paper's top_k = N - drop)

    def __post_init__(self) -> None:
        if self.keep_ratio is not None and self.drop is not None:
            raise ValueError(f"pass keep_ratio or drop, not both (got keep_ratio={self.keep_ratio!r}, drop={self.drop!r})")
        if self.drop is not None:
            self.drop = as_int("drop", self.drop, 0)
        else:
            ratio = DEFAULT_KEEP_RATIO if self.keep_ratio is None else self.keep_ratio
            self.keep_ratio = as_real("keep_ratio", ratio, 0, 1, low_open=True)

    def top_k(self, num_patches: int) -> int:
        """Patch tokens kept out of ``num_patches``."""
        if self.drop is None:
            return math.ceil(self.keep_ratio * num_patches)
        if self.drop >= num_patches:
            raise ValueError(f"drop must be in [0, {num_patches - 1}] for {num_patches} patch tokens, got {self.drop}")
        return num_patches - self.drop

    def schedule(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        return [num_prefix + self.top_k(num_tokens - num_prefix)] * depth

    def select(self, x: Tensor, ctx: LayerContext) -> Selection | None:
        n, p = x.shape[1], ctx.num_prefix
        if ctx.layer != 0 or ctx.num_out == n:
            return None
        pixels = ctx.pixel_patches()
        if pixels.shape[:2] != (x.shape[0], n - p):
            raise ValueError(
                f"the input image has {pixels.shape[1]} patches for {n - p} patch tokens (batch {pixels.shape[0]} for "
                f"{x.shape[0]}): vwt needs the tokens of the image the patch embedding just saw"
            )
        top = top_k_positions(pixels.float().var(dim=-1), ctx.num_out - p)
        prefix = torch.arange(p, device=x.device).expand(x.shape[0], -1)
        return keep(torch.cat([prefix, top + p], dim=1), n)
