"""``lvlm_csp``: LVLM_CSP (Chen et al., "LVLM_CSP: Accelerating Large Vision Language Models via
Clustering, Scattering, and Pruning for Reasoning Segmentation", ACM MM 2025, arXiv 2504.10854)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenreduce.core import Selection, keep
from tokenreduce.methods.llm import LLMContext, LLMMethod, check_layer, fraction
from tokenreduce.registry import register_method
from tokenreduce.validate import as_int, as_int_tuple

CLUSTERINGS = ("uniform", "random")


@register_method
@dataclass
class LVLMCSP(LLMMethod):
    """Three stages inside the LLM: cluster, scatter, prune. Paper only (no code found).

    The paper: "Initially, the LVLM performs coarse-grained visual reasoning using a subset of selected
    image tokens. Next, fine-grained reasoning is conducted, and finally, most visual tokens are pruned
    in the last stage" (abstract). Here, with ``layers = (a, b, c)``:

    1. Cluster, before layer ``a``: each image keeps ``N_c = round(cluster_ratio * N)`` representative
       tokens, chosen ``"uniform"`` (the paper's ``S[i] = i * floor(N / N_c)``) or ``"random"`` (seeded
       by ``seed``: the same draw for every image of ``N`` tokens, so a row picks alone what it picks in
       a batch); layers ``a .. b-1`` and their KV cache hold only those.
    2. Scatter, before layer ``b``: every image token comes back. Ours, where the paper's rule is not
       readable: each token belongs to the representative its layer-``a`` hidden state is most
       cosine-similar to (a representative to itself; ties: the earlier one) and gets that
       representative's update over layers ``a .. b-1`` as a residual, ``h_i <- h_i^a + (h_r^b - h_r^a)``;
       representatives take ``h_r^b``.
    3. Prune, before layer ``c``: each image keeps the ``round(keep_ratio * N)`` tokens the last prompt
       token attends to most at layer ``c - 1`` (softmax, mean over heads), in order. The paper scores by
       the ``[SEG]`` token's attention; a generic prompt has none, so the last prompt token stands in
       (as in FastV).

    Left open by the paper and chosen here: ``layers`` default to ``depth // 4, depth // 2, 3 depth // 4``
    (8, 16, 24 of 32); ``cluster_ratio`` and ``keep_ratio`` default to 0.25; positions ``"keep"``
    (every token keeps its position id, so scattered tokens come back where they were). The paper's
    other clusterings (the ViT's CLS attention, a segmentation model's instances) need inputs the LLM
    stage does not have and are not offered. With the defaults, the image tokens' share of the
    layers' work is ``(8 + 8 * 0.25 + 8 + 8 * 0.25) / 32 = 62.5%`` (the paper reports 35% at its
    own, unstated, stage layers).
    """

    name = "lvlm_csp"
    paper = (
        "Chen et al., LVLM_CSP: Accelerating Large Vision Language Models via Clustering, Scattering, and Pruning, ACM MM 2025"
    )

    layers: Sequence[int] | None = None  # (cluster a, scatter b, prune c)
    cluster_ratio: float = 0.25  # N_c / N, the representatives of layers a .. b-1
    keep_ratio: float = 0.25  # tokens kept from layer c on
    clustering: str = "uniform"
    seed: int = 0  # of "random" clustering
    positions: str = "keep"

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.layers = as_int_tuple("layers", self.layers, 1)
            if len(self.layers) != 3 or list(self.layers) != sorted(set(self.layers)):
                raise ValueError(f"layers must be 3 increasing layer indices (cluster, scatter, prune), got {self.layers}")
        self.cluster_ratio = fraction("cluster_ratio", self.cluster_ratio)
        self.keep_ratio = fraction("keep_ratio", self.keep_ratio)
        if self.clustering not in CLUSTERINGS:
            raise ValueError(f"clustering must be one of {CLUSTERINGS}, got {self.clustering!r}")
        self.seed = as_int("seed", self.seed, 0)
        self.check_positions()

    def stages(self, depth: int) -> tuple[int, ...]:
        """``(a, b, c)`` checked against an LLM of ``depth`` layers."""
        layers = tuple(self.layers or (depth // 4, depth // 2, 3 * depth // 4))
        if len(set(layers)) < 3 or layers[0] < 1:  # only the defaults, on an LLM of fewer than 4 layers
            raise ValueError(
                f"an LLM of {depth} layers cannot hold lvlm_csp's three stages (cluster, scatter, prune): it needs 4"
            )
        for layer in layers:
            check_layer("layers", layer, depth)
        return layers

    def prune_layers(self, depth: int) -> tuple[int, ...]:
        a, _, c = self.stages(depth)
        return (a, c)

    def restore_layers(self, depth: int) -> dict[int, int]:
        a, b, _ = self.stages(depth)
        return {a: b}

    def kept(self, tokens: int, stage: int) -> int:
        return max(1, round((self.cluster_ratio, self.keep_ratio)[stage] * tokens))

    def select(self, ctx: LLMContext) -> list[Selection]:
        return [self.cluster(ctx, i) if ctx.stage == 0 else self.prune(ctx, i) for i in range(len(ctx.spans))]

    def representatives(self, n: int, count: int, device: torch.device) -> torch.Tensor:
        """The ``count`` representatives of ``n`` tokens, in order."""
        if self.clustering == "uniform":
            return torch.arange(count, device=device) * (n // count)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(n, generator=generator)[:count].sort().values.to(device)

    def cluster(self, ctx: LLMContext, i: int) -> Selection:
        span = ctx.spans[i]
        reps = self.representatives(span.length, ctx.keep[i], ctx.hidden.device)
        tokens = torch.nn.functional.normalize(ctx.hidden[span.row, span.start : span.start + span.length].float(), dim=-1)
        nearest = (tokens @ tokens[reps].T).argmax(dim=-1)
        nearest[reps] = torch.arange(reps.shape[0], device=reps.device)
        return Selection(nearest[None], reps[None], gather_only=True)  # the others: pruned, scattered back later

    def prune(self, ctx: LLMContext, i: int) -> Selection:
        assert ctx.attention is not None
        span = ctx.spans[i]
        scores = ctx.attention[span.row, span.start : span.start + span.length]
        return keep(scores.topk(ctx.keep[i]).indices.sort().values[None], span.length)
