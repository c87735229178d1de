"""``vomix``: Vote&Mix (Peng et al., "Vote&Mix: Plug-and-Play Token Reduction for Efficient Vision
Transformer", arXiv 2408.17062, ICME 2025)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from tokenreduce.core import Selection, vote_and_mix
from tokenreduce.methods.base import Budget, EncoderMethod, LayerContext
from tokenreduce.registry import register_method
from tokenreduce.validate import as_bool, as_real


@register_method
@dataclass
class VoMix(EncoderMethod):
    """In every block, remove the fraction ``r`` of the tokens that similarity voting finds most
    homogeneous and mix them into the tokens kept.

    The paper (abstract): VoMix is "a plug-and-play and parameter-free token reduction method" applied
    "without any training"; it identifies "tokens with high homogeneity through a layer-wise token
    similarity voting mechanism", and "the selected tokens are mixed into the retained set, thereby
    preserving visual information". No code was released and the paper's method section could not be
    retrieved: the rule below follows the abstract, the description of a third-party reimplementation
    in the method specification (unverified, repository not identified) and the paper's stated cost
    ``O(N^2 D (1/H + r(1 - r)))`` (quoted in a secondary summary). Per block, at ``N`` tokens of which
    ``P`` are prefix tokens:

    1. Similarity: cosine similarity of the block's attention keys averaged over heads (ToMe's metric).
       Its width ``D/H`` is our reading of the ``N^2 D / H`` term; the metric itself is our choice.
    2. Vote: each non-prefix token votes for its most similar other non-prefix token, "weight = that
       similarity" (the specification's wording); a token's score is the sum of the votes it receives.
    3. Remove the ``floor(r (N - P))`` highest-scored tokens (a secondary summary: "reducing the token
       count by a factor r per layer"; we read the fraction as one of the current non-prefix tokens;
       equal scores: the earlier token first).
    4. Mix: ``W = softmax over kept tokens of sim[removed, kept] / temperature``; ``x_kept += W^T
       x_removed``, added and not renormalised (the specification's wording: each removed token is
       mixed into every kept one, as the ``r(1 - r) N^2 D`` term implies). With ``temperature=1`` (the
       softmax of cosines in ``[-1, 1]``) the weights are flat; lower temperatures concentrate each
       removed token on its nearest kept tokens.

    Choices the paper leaves open (all ours): the hook is after the attention residual, before the MLP
    (ToMe's point: the removed tokens take part in that block's attention, as keys and as queries, and
    the block's own keys are the metric, so attention keeps SDPA). Another secondary summary says the
    process affects only self-attention, at a cost of ``O(N^2 D (1 - r))``, which suggests that the paper
    mixes before attention and keeps every token as a key there while only the kept ones are queries;
    that needs attention with fewer queries than keys, which tokenreduce's blocks do not run. Every
    block reduces; prefix tokens
    (class, distillation, registers) neither vote, are voted for, nor receive mixed tokens; sizes follow
    the mixing weights (each removed token's size is shared among the kept tokens by ``W``) and no
    proportional attention unless ``prop_attn=True``. The kept tokens stay in position order. Dense
    outputs rebuild a removed token from the kept tokens it was mixed into, by its weights.

    Default ``r=0.09``: the paper's value was not retrieved. 0.09 removes about as much as ToMe r=13 does
    on DeiT-S (197 -> 67 tokens, 2.73 GMACs by the analytic count, -41%; ToMe r=13: 2.70). The paper's
    "2x increase in throughput of existing ViT-H" with every one of its 32 blocks reducing would mean
    r of about 0.05 (derived, not from the paper).
    """

    name = "vomix"
    budget = Budget("r", 0.0, 0.99, increasing=False)
    paper = "Peng et al., Vote&Mix: Plug-and-Play Token Reduction for Efficient Vision Transformer, ICME 2025"

    r: float = 0.09  # fraction of the non-prefix tokens removed (and mixed) in each block
    temperature: float = 1.0  # of the mixing softmax over cosine similarities
    prop_attn: bool = False  # weight attention by log(token size)

    def __post_init__(self) -> None:
        self.r = as_real("r", self.r, 0, 1, high_open=True)
        self.temperature = as_real("temperature", self.temperature, 0, None, low_open=True)
        self.prop_attn = as_bool("prop_attn", self.prop_attn)

    def schedule(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        n, out = num_tokens, []
        for _ in range(depth):
            n -= math.floor(self.r * (n - num_prefix))
            out.append(n)
        return out

    def select(self, x: Tensor, ctx: LayerContext) -> Selection | None:
        remove = x.shape[1] - ctx.num_out
        if remove == 0:
            return None
        return vote_and_mix(ctx.metric(), remove, ctx.num_prefix, self.temperature)
