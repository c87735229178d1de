"""``todre``: ToDRE (Li, Yang, Lu, "ToDRE: Visual Token Pruning via Diversity and Task Awareness for
Efficient Large Vision-Language Models", arXiv 2505.18757 v1, 2025; v2 retitled "ToDRE: Effective Visual
Token Pruning via Token Diversity and Task Relevance"). Paper only: no code was published.

One name, two places. ``tokenreduce.apply(vlm, "todre")`` builds :class:`ToDRE`, a preset
:class:`~tokenreduce.methods.stack.Stack`: the adapters already run a stack's pre-LLM part on the
projected features and its in-LLM part inside the decoder, so the method needs no adapter of its own.
Its pre-LLM part alone is ``apply(vlm, ToDREDiversity(keep_ratio=0.1))``, and it stacks with any in-LLM
method (``apply(vlm, [ToDREDiversity(), "fastv"])``); it is not registered under the name, since a
name registered at two stages resolves to the pre-LLM one by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenreduce.core import Selection, keep, max_min_subset, max_sum_subset
from tokenreduce.methods.llm import LLMContext, LLMMethod, check_layer
from tokenreduce.methods.stack import PresetStack
from tokenreduce.methods.visual import VisualContext, VisualMethod
from tokenreduce.registry import loadable, register_method
from tokenreduce.validate import as_int

PAPER = "Li et al., ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient LVLMs, arXiv 2505.18757"
SUBSETS = {"k_center": max_min_subset, "max_sum": max_sum_subset}


@loadable
@dataclass
class ToDREDiversity(VisualMethod):
    """ToDRE's first stage: keep a diverse subset of each image's visual tokens before the LLM.

    The paper's rule: v1 "introduces a greedy k-center algorithm to select and retain a small subset of
    diverse visual tokens after the vision encoder" (``algorithm="k_center"``, the default); v2 replaces
    it by "a greedy max-sum diversification algorithm that selects and retains a subset of diverse and
    representative visual tokens" (``algorithm="max_sum"``). Default ``keep_ratio=0.1`` (the paper
    "reduces 90% of visual tokens after vision encoder").

    Choices the paper's text (as available to us) leaves open: the distance is the cosine distance of
    the projected tokens (what the LLM reads), in float32; the greedy k-center starts from the token
    farthest from its nearest neighbour (DivPrune's start, so ``k_center`` shares ``max_min_subset``
    with ``divprune``), each next pick maximising its distance to the nearest kept token; the max-sum
    greedy starts from the token with the largest summed distance to all tokens, each next pick
    maximising its summed distance to the kept ones; ties go to the lowest index; the kept tokens go to
    the LLM in their original order.
    """

    name = "todre_diversity"
    paper = PAPER
    default_keep_ratio = 0.1

    algorithm: str = "k_center"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.algorithm not in SUBSETS:
            raise ValueError(f"algorithm must be one of {tuple(SUBSETS)}, got {self.algorithm!r}")

    def select(self, ctx: VisualContext) -> Selection:
        picked = SUBSETS[self.algorithm](ctx.features, ctx.keep)
        return keep(picked.sort(dim=1).values, ctx.features.shape[1])


@loadable
@dataclass
class InformationMigration(LLMMethod):
    """ToDRE's second stage: drop **every** visual token before LLM layer ``layer`` (default: the
    middle layer, ``depth // 2``); text tokens keep their position ids, and the layers from there on
    (and their KV cache) hold the text alone.

    The paper: "ToDRE addresses the 'information migration' by further eliminating task-irrelevant
    visual tokens within the decoder of large language model", pruning "all visual tokens within
    certain LLM's decoder layers" (v1), and v2 "prunes 90% of visual tokens after the vision encoder as
    well as all visual tokens in certain LLM decoder layers". Task relevance is the reason why (the
    visual information has migrated to the text tokens by then), not a score computed at run time: the
    rule drops all visual tokens whatever the prompt, so it needs no attention and keeps any attention
    kernel (the paper claims "compatibility with efficient attention operators"). Choices left open:
    the layer (the text we could read gives none; we default to the middle of the LLM) and one layer
    for all prompts (v1's "adaptively" is not specified further).
    """

    name = "todre_migration"
    paper = PAPER
    scores = "none"

    layer: int | None = None
    positions: str = "keep"

    def __post_init__(self) -> None:
        if self.layer is not None:
            self.layer = as_int("layer", self.layer, 1)
        self.check_positions()

    def prune_layers(self, depth: int) -> tuple[int, ...]:
        layer = depth // 2 if self.layer is None else self.layer
        check_layer("layer", layer, depth)
        return (layer,)

    def kept(self, tokens: int, stage: int) -> int:
        return 0

    def select(self, ctx: LLMContext) -> list[Selection]:
        none = torch.empty(1, 0, dtype=torch.long, device=ctx.hidden.device)
        return [keep(none, span.length) for span in ctx.spans]


@register_method
@dataclass
class ToDRE(PresetStack):
    """ToDRE: the diverse ``keep_ratio`` share (or ``keep_tokens``) of each image's tokens goes to the
    LLM (:class:`ToDREDiversity`, ``algorithm`` ``"k_center"`` or ``"max_sum"``), and before LLM layer
    ``layer`` every visual token left is dropped (:class:`InformationMigration`). ``positions`` is the
    pre-LLM part's (``"auto"``: reindexed for LLaVA-style models, kept for M-RoPE); the text after the
    migration layer keeps its position ids. Defaults: ``keep_ratio=0.1``, ``algorithm="k_center"`` (v1),
    ``layer=None`` (the LLM's middle layer)."""

    name = "todre"
    paper = PAPER

    keep_ratio: float | None = None
    keep_tokens: int | None = None
    algorithm: str = "k_center"
    layer: int | None = None
    positions: str = "auto"

    def __post_init__(self) -> None:
        self.before = ToDREDiversity(self.keep_ratio, self.keep_tokens, self.positions, algorithm=self.algorithm)
        self.inside = InformationMigration(self.layer)
        self.keep_ratio, self.keep_tokens, self.layer = self.before.keep_ratio, self.before.keep_tokens, self.inside.layer
        super().__post_init__()
