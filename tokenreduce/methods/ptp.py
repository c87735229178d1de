"""``ptp``: PTP, Pyramid Token Pruning (Liang et al., "Pyramid Token Pruning for High-Resolution Large
Vision-Language Models via Region, Token, and Instruction-Guided Importance", IEEE TCSVT, arXiv
2509.15704). Paper only: no public code."""

from __future__ import annotations

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
class PTP(AnyResRegions):
    """On AnyRes prompts (LLaVA-NeXT; LLaVA-OneVision with a class-token tower): the base image
    (thumbnail) says how salient each crop's region is, which sets how many tokens the crop keeps;
    within the thumbnail and each crop, tokens are kept by their own saliency mixed with their
    relevance to the prompt's text.

    Paper only, read in its abstract alone: PTP "hierarchically integrates bottom-up visual saliency at
    both region and token levels with top-down instruction-guided relevance" and "selectively preserves
    more tokens from salient regions while further emphasizing those most relevant to task
    instructions". Every rule below is ours:

    1. Budgets: the thumbnail keeps ``round(r * its tokens)``, the crops ``round(r * their tokens left
       after unpadding)`` in all (``r = keep_ratio``, default 0.25), every newline token stays
       (:class:`~tokenreduce.methods.visual.AnyResRegions`).
    2. Region saliency (bottom-up, region level): a crop's saliency ``S_i`` is the thumbnail's class-token
       attention (mean over heads, at the vision layer the VLM reads) summed over the crop's region of the
       thumbnail; the crops share their total in proportion to ``U_i * S_i`` (``U_i`` the crop's tokens
       left after unpadding), largest remainders, none above ``U_i``.
    3. Token saliency (bottom-up, token level): a token's class-token attention in its own crop (or in
       the thumbnail).
    4. Instruction relevance (top-down): a token's highest cosine similarity, in the LLM's
       input-embedding space, to any text token of its prompt (images excluded); 0 without text.
    5. In each region (the thumbnail and every crop) both are scaled to [0, 1] (min to max; 0 where all
       are equal) and mixed as ``(1 - text_weight) * saliency + text_weight * relevance``
       (``text_weight`` default 0.5); the region keeps its best tokens, equal scores to the earlier token.
    6. The kept tokens stay in the span's order, so ``keep_ratio=1`` is the unpatched model.
    """

    name = "ptp"
    paper = (
        "Liang et al., Pyramid Token Pruning for High-Resolution Large Vision-Language Models via Region, Token, "
        "and Instruction-Guided Importance, IEEE TCSVT, arXiv 2509.15704"
    )
    needs_text = True
    default_keep_ratio = 0.25

    text_weight: float = 0.5  # share of instruction relevance in a token's score (the rest: its saliency)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.text_weight = as_real("text_weight", self.text_weight, 0, 1)

    def crop_budgets(self, thumbnail: Tensor, layout: AnyResLayout) -> Tensor:
        """``[M, rows * cols]`` long: tokens each crop keeps, from the thumbnail's class-token attention
        ``thumbnail [M, side * side]`` (raster order); rows sum to the crops' total."""
        rows, cols = layout.crops
        region = self.thumbnail_regions(layout, thumbnail.device)
        saliency = thumbnail.new_zeros(thumbnail.shape[0], rows * cols).index_add_(1, region, thumbnail)
        counts = torch.stack([(layout.part == 1 + i).sum() for i in range(rows * cols)]).to(thumbnail.device)
        return apportion(saliency * counts, self.part_budgets(layout)[1], counts)

    def select(self, ctx: VisualContext) -> Selection:
        layout, cls = ctx.anyres, ctx.cls_attention
        if layout is None or cls is None:
            raise TypeError("ptp selects among the tokens of AnyRes prompt spans (LLaVA-NeXT, OneVision)")
        text, text_mask = ctx.prompt_text(self.name)
        cls = cls.float()
        part = layout.part.to(cls.device)
        similarity = F.normalize(ctx.features.float(), dim=-1) @ F.normalize(text.float(), dim=-1).transpose(1, 2)
        relevance = similarity.masked_fill(~text_mask[:, None, :], -torch.inf).amax(dim=-1)  # [M, L]
        relevance = relevance.nan_to_num(0.0, neginf=0.0)  # a prompt without text
        base = (part == 0).nonzero().squeeze(1)
        budgets = self.crop_budgets(cls[:, base], layout).tolist()
        regions = [(base, self.part_budgets(layout)[0])]
        newlines = (part < 0).nonzero().squeeze(1)
        rows = []
        for m in range(cls.shape[0]):
            chosen = [newlines]
            crops = [((part == 1 + i).nonzero().squeeze(1), budget) for i, budget in enumerate(budgets[m])]
            for tokens, budget in regions + crops:
                if budget:
                    score = (1 - self.text_weight) * _unit_range(cls[m, tokens])
                    score = score + self.text_weight * _unit_range(relevance[m, tokens])
                    chosen.append(tokens[score.argsort(descending=True, stable=True)[:budget]])
            rows.append(torch.cat(chosen).sort().values)
        return keep(torch.stack(rows), cls.shape[1])


def _unit_range(x: Tensor) -> Tensor:
    """``x`` scaled to [0, 1] from its minimum to its maximum (zeros where they are equal)."""
    span = x.max() - x.min()
    return (x - x.min()) / span if bool(span > 0) else torch.zeros_like(x)
