"""``globalcom2``: GlobalCom2 (Liu et al., "Global Compression Commander: Plug-and-Play Inference
Acceleration for High-Resolution Large Vision-Language Models", AAAI 2026, arXiv 2501.05179; earlier
"Compression with Global Guidance: Towards Training-free High-Resolution MLLMs Acceleration")."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenreduce.core import Selection, apportion, keep
from tokenreduce.methods.visual import AnyResLayout, AnyResRegions, VisualContext
from tokenreduce.registry import register_method
from tokenreduce.validate import as_real


@register_method
@dataclass
class GlobalCom2(AnyResRegions):
    """On AnyRes prompts (LLaVA-NeXT; LLaVA-OneVision with a class-token tower), the base image
    (thumbnail) decides how many tokens each crop keeps, then each crop keeps its best tokens.

    From the reference (``xuyang-liu16/GlobalCom2`` ``llava/model/llava_arch.py`` at 96b2d00:
    ``compress_thumbnail``, ``generate_scale_for_crop_features``, ``select_topk_crop_features``), with
    ``r = keep_ratio`` (the reference's module constant ``retention_ratio``, default 0.25) and the
    class token's softmax attention (mean over heads) at the vision layer the VLM reads:

    1. Thumbnail: keep its ``r`` share of tokens of highest class-token attention.
    2. Crop budgets: the thumbnail's attention summed over the region of each crop (the thumbnail grid
       cut in ``rows x cols`` blocks of ``max(side // rows, 1)`` by ``max(side // cols, 1)`` patches,
       the last block taking the remainder) is ``s``; ``p = softmax(s / temperature)`` (temperature
       10); crop ``i`` keeps ``min(1, r * (1 + p_i - mean(p)))`` of its tokens left after unpadding.
    3. In a crop: score = L2-normalised crop class-token attention + L2-normalised thumbnail
       attention bilinearly resized (``align_corners=False``) to the unpadded grid of all crops and cut
       per crop; keep the top ones.
    4. Every newline token stays; the LLM reads the kept tokens in the span's order.

    Choices made here (the reference leaves them open or its code does something else):
    - Fixed counts: each image keeps ``round(r * n0)`` thumbnail tokens (at least 1) and
      ``round(r * U)`` crop tokens (``U`` its crop tokens left after unpadding), plus its newline
      tokens, so images of one size keep the same count and batch together. The crops share their
      total in proportion to step 2's ``U_i * scale_i`` (largest remainders, none above ``U_i``:
      :func:`~tokenreduce.core.apportion`), where the reference truncates each ``U_i * scale_i`` and
      the image's total varies with the attention. Where every crop has the same count and no scale
      is clipped this is the reference's rule up to its truncation.
    - The thumbnail's kept tokens stay in raster order (the reference orders them by score), so that
      ``keep_ratio=1`` is the unpatched model.
    - Each image uses its own thumbnail (the reference reads the first image's of the batch).
    - On OneVision, where packing downscales large unpadded grids, a token reads the attention of its
      nearest patch.
    """

    name = "globalcom2"
    paper = (
        "Liu et al., Global Compression Commander: Plug-and-Play Inference Acceleration for High-Resolution "
        "Large Vision-Language Models, AAAI 2026"
    )
    default_keep_ratio = 0.25

    temperature: float = 10.0  # of the softmax over the crops' summed thumbnail attention

    def __post_init__(self) -> None:
        super().__post_init__()
        self.temperature = as_real("temperature", self.temperature, 0, math.inf, low_open=True)

    def crop_budgets(self, thumbnail: Tensor, layout: AnyResLayout) -> Tensor:
        """``[M, rows * cols]`` long: tokens each crop keeps, from the thumbnail's class-token
        attention ``thumbnail [M, side * side]`` (raster order); rows sum to the crops' total."""
        rows, cols = layout.crops
        region = self.thumbnail_regions(layout, thumbnail.device)
        summed = thumbnail.new_zeros(thumbnail.shape[0], rows * cols).index_add_(1, region, thumbnail)
        p = (summed / self.temperature).softmax(dim=1)
        scale = (self.keep_ratio * (1 + p - p.mean(dim=1, keepdim=True))).clamp(max=1)
        counts = torch.stack([(layout.part == 1 + i).sum() for i in range(rows * cols)]).to(thumbnail.device)
        return apportion(scale * counts, self.part_budgets(layout)[1], counts)

    def select(self, ctx: VisualContext) -> Selection:
        layout, cls = ctx.anyres, ctx.cls_attention
        if layout is None or cls is None:
            raise TypeError("globalcom2 selects among the tokens of AnyRes prompt spans (LLaVA-NeXT, OneVision)")
        cls = cls.float()
        device = cls.device
        part, row, col = layout.part.to(device), layout.row.to(device), layout.col.to(device)
        side = layout.side
        base = (part == 0).nonzero().squeeze(1)  # raster order: the span starts with the thumbnail
        thumbnail = cls[:, base]
        kept_thumbnail, _, _ = self.part_budgets(layout)
        budgets = self.crop_budgets(thumbnail, layout).tolist()
        in_crop = part > 0
        top, left = int(row[in_crop].min()), int(col[in_crop].min())
        height, width = int(row[in_crop].max()) - top + 1, int(col[in_crop].max()) - left + 1
        guide = F.interpolate(thumbnail.view(-1, 1, side, side), size=(height, width), mode="bilinear", align_corners=False)
        guide = guide[:, 0, (row - top).clamp(0, height - 1), (col - left).clamp(0, width - 1)]  # [M, L]
        newlines = (part < 0).nonzero().squeeze(1)
        crops = [(part == 1 + i).nonzero().squeeze(1) for i in range(len(budgets[0]))]
        rows = []
        for m in range(cls.shape[0]):
            chosen = [base[thumbnail[m].topk(kept_thumbnail).indices], newlines]
            for tokens, budget in zip(crops, budgets[m]):
                if budget:
                    score = F.normalize(cls[m, tokens], dim=0) + F.normalize(guide[m, tokens], dim=0)
                    chosen.append(tokens[score.topk(budget).indices])
            rows.append(torch.cat(chosen).sort().values)
        return keep(torch.stack(rows), cls.shape[1])
