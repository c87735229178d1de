"""``aim``: AIM (Zhong et al., "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and
Pruning", arXiv 2412.03248)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenreduce.core import Selection, bipartite_soft_matching, head_rms, keep, weighted_pagerank
from tokenreduce.methods.llm import LLMContext, LLMMethod, check_layer
from tokenreduce.methods.stack import PresetStack
from tokenreduce.methods.visual import VisualContext, VisualMethod
from tokenreduce.registry import loadable, register_method
from tokenreduce.validate import as_int, as_real, as_sequence

REFERENCE_DEPTH = 28  # LLaVA-OneVision-7B's Qwen2, where pruning starts after layer 14
REFERENCE_LAYER = 14
ROUNDS = (0.5, 0.25)  # ToMe rounds before the LLM: r = N // 2, then N // 4 (25% kept)
REMOVALS = ("drop", "mask")  # tokens removed from the sequence and cache, or (the reference's) masked
PAPER = "Zhong et al., AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning, arXiv 2412.03248"


def _rounds(tokens: int, rounds: Sequence[float]) -> list[int]:
    """Tokens each ToMe round removes from an image of ``tokens`` (at most half of what is left)."""
    out, left = [], tokens
    for share in rounds:
        r = min(int(tokens * share), left // 2)
        out.append(r)
        left -= r
    return out


@loadable
@dataclass
class AIMMerge(VisualMethod):
    """AIM's merge before the LLM: ToMe's bipartite soft matching on the projected tokens (cosine of
    the tokens themselves, plain means), once per share in ``rounds``, each removing ``int(N * share)``
    of the image's ``N`` tokens (at most half of those left). Built by :class:`AIM`."""

    name = "aim_merge"
    paper = PAPER
    default_keep_ratio = None

    rounds: Sequence[float] = ROUNDS

    def __post_init__(self) -> None:
        super().__post_init__()
        shares = as_sequence("rounds", self.rounds, "fractions in [0, 0.5]")
        self.rounds = tuple(as_real(f"rounds[{i}]", s, 0, 0.5) for i, s in enumerate(shares))

    def has_own_budget(self) -> bool:
        return True

    def num_kept(self, num_tokens: int, grid: tuple[int, int] | None) -> int:
        return num_tokens - sum(_rounds(num_tokens, self.rounds))

    def select(self, ctx: VisualContext) -> Selection:
        x = ctx.features
        total = None
        for r in filter(None, _rounds(x.shape[1], self.rounds)):  # a round that merges nothing would reorder
            step = bipartite_soft_matching(x, r)
            x = step.apply(x)
            total = step if total is None else total.then(step)
        return total if total is not None else keep(torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1), x.shape[1])


@loadable
@dataclass
class AIMPrune(LLMMethod):
    """AIM's pruning inside the LLM: from layer ``layer`` on, each layer's attention scores the tokens by
    PageRank (``M = softmax(logits / temperature)`` over the causal row; ``s`` uniform over the real
    tokens; ``iterations`` times ``s <- s M``; ``sqrt(mean over heads of s^2)``) and the next layer keeps
    the top ``int(V * (1 - (j + 1) * step))`` of each image's ``V`` tokens at the LLM's input (``j`` = 0
    after ``layer``), down to one token; ``removal`` drops the others or masks them (see :class:`AIM`).
    Built by :class:`AIM`."""

    name = "aim_prune"
    paper = PAPER
    scores = "queries"

    layer: int | None = None
    step: float = 0.125
    temperature: float = 0.1
    iterations: int = 5
    positions: str = "keep"
    removal: str = "drop"

    @property
    def masks_only(self) -> bool:  # type: ignore[override]
        return self.removal == "mask"

    def __post_init__(self) -> None:
        if self.removal not in REMOVALS:
            raise ValueError(f"removal must be one of {REMOVALS}, got {self.removal!r}")
        if self.layer is not None:
            self.layer = as_int("layer", self.layer, 0)
        self.step = as_real("step", self.step, 0, 1, low_open=True)
        self.temperature = as_real("temperature", self.temperature, 0, None, low_open=True)
        self.iterations = as_int("iterations", self.iterations, 1)
        self.check_positions()
        if self.removal == "mask" and self.positions != "keep":
            raise ValueError(f"removal='mask' leaves every token in its place: positions must be 'keep', got {self.positions!r}")

    def prune_layers(self, depth: int) -> tuple[int, ...]:
        first = REFERENCE_LAYER * depth // REFERENCE_DEPTH if self.layer is None else self.layer
        check_layer("layer (+1: pruning follows the scoring layer)", first + 1, depth)
        stages = math.ceil(1 / self.step - 1e-9)  # the last one keeps nothing
        return tuple(range(first + 1, min(depth, first + 1 + stages)))

    def kept(self, tokens: int, stage: int) -> int:
        return max(1, int(tokens * max(0.0, 1 - (stage + 1) * self.step)))

    def select(self, ctx: LLMContext) -> list[Selection]:
        assert ctx.queries is not None and ctx.keys is not None and ctx.scale is not None
        q = ctx.queries.float()
        k = ctx.keys.float().repeat_interleave(q.shape[1] // ctx.keys.shape[1], dim=1)
        length = q.shape[2]
        real = ctx.mask.bool()
        positions = torch.arange(length, device=q.device)
        visible = (positions[None, :] <= positions[:, None])[None] & real[:, None, :]
        if ctx.masked is not None:  # masked tokens receive nothing, their own rows included
            visible &= ~ctx.masked[:, None, :]
        eye = torch.eye(length, dtype=torch.bool, device=q.device)[None]
        visible |= eye & ~visible.any(dim=-1, keepdim=True)  # a query seeing nothing (padding) sees itself
        logits = (q @ k.transpose(-1, -2)) * ctx.scale / self.temperature
        probs = logits.masked_fill(~visible[:, None], float("-inf")).softmax(dim=-1)
        scores = head_rms(weighted_pagerank(probs, self.iterations, alive=real))
        if ctx.masked is not None:
            scores = scores.masked_fill(ctx.masked, float("-inf"))
        out = []
        for span, count in zip(ctx.spans, ctx.keep):
            image = scores[span.row, span.start : span.start + span.length]
            out.append(keep(image.topk(count).indices.sort().values[None], span.length))
        return out


@register_method
@dataclass
class AIM(PresetStack):
    """ToMe merging before the LLM (:class:`AIMMerge`), then PageRank pruning inside it (:class:`AIMPrune`).

    From the reference (``dragonlzm/AIM`` at 4f4bb81: ``llava/model/llava_arch.py`` and ``token_merge.py``
    for the merge, the vendored ``modeling_qwen2.py`` ``get_importance`` and the decoder loop for the
    pruning): ``rounds=(0.5, 0.25)`` (``r = N // 2`` then ``N // 4``: 25% kept, the merged tokens in
    ToMe's order, unmerged then destination tokens), pruning from layer 14 of 28 (``layer=None`` scales
    it to the model's depth) by ``step=0.125`` a layer, ``temperature=0.1``, ``iterations=5``; text is
    never pruned; the merged tokens are numbered as the LLM gets them (re-indexed on 1-D positions) and
    pruning inside the LLM keeps positions (``positions="keep"``; the reference masks).

    ``removal`` says what becomes of the tokens a layer does not keep. ``"drop"`` (the default, a
    departure the task asks for): they are removed from the sequence and the KV cache (the reference
    only masks them and so saves no time), so a removed token neither gives nor receives in later
    layers' PageRank (``s`` starts uniform over the tokens still there). ``"mask"``: the reference's
    (its accuracy setting; it saves no compute, every layer still runs on every token and caches it):
    from the pruning layer on, the token stays in the sequence and the cache, positions unchanged, but
    its column is masked for every later query, its own included, on decode steps too (the reference
    ANDs the 2-D mask with the kept tokens and rebuilds the causal mask; ``attention_mask_cache`` for
    decoding). A masked token's own query row still runs, over the visible tokens before it, and in the
    PageRank (``get_importance`` on the logits plus that mask) ``s`` starts uniform over every token,
    masked ones included, whose rows pass their share on while their columns receive nothing; a masked
    token is never chosen again (the reference scores it -1). Where a masked token would see nothing (no
    visible token before it), its row keeps its own column, so that no attention row is empty.

    Each image keeps at least one token (the reference's last stage keeps none): the engine follows
    every image as a non-empty span of the sequence.

    Choices the reference leaves open: each image of a prompt keeps its own share (the reference ranks
    a row's visual tokens together); padding tokens take no part in the PageRank; the count is
    ``int(V * rate)`` with ``V`` the image's tokens at the LLM's input, as the reference's
    ``int(protected + V * rate)``.
    """

    name = "aim"
    paper = PAPER

    rounds: Sequence[float] = ROUNDS
    layer: int | None = None
    step: float = 0.125
    temperature: float = 0.1
    iterations: int = 5
    positions: str = "keep"
    removal: str = "drop"

    def __post_init__(self) -> None:
        self.before = AIMMerge(rounds=self.rounds)  # the LLM numbers the merged tokens it gets, as the reference's
        self.inside = AIMPrune(
            layer=self.layer,
            step=self.step,
            temperature=self.temperature,
            iterations=self.iterations,
            positions=self.positions,
            removal=self.removal,
        )
        self.rounds = self.before.rounds
        self.layer, self.step, self.temperature, self.iterations = (
            self.inside.layer,
            self.inside.step,
            self.inside.temperature,
            self.inside.iterations,
        )
        super().__post_init__()
