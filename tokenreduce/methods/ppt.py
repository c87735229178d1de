"""``ppt``: token Pruning and Pooling (Wu et al., "PPT: Token Pruning and Pooling for Efficient Vision
Transformers", arXiv 2310.01812), used training-free."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from tokenreduce.core import Selection, bipartite_soft_matching, choose_rows, keep, keep_indices
from tokenreduce.methods.base import Budget, EncoderMethod, LayerContext, as_layers, layers_for_depth
from tokenreduce.registry import register_method
from tokenreduce.validate import as_bool, as_int, as_real


@register_method
@dataclass
class PPT(EncoderMethod):
    """At a few blocks, remove ``r`` tokens per image either by pooling (ToMe merging) or by pruning,
    whichever the image's token significance asks for.

    After the attention of each reduction block (reference ``xjwu1024/PPT`` at 706bcdd, ``ppt_deit.py``):

    1. Significance of every non-prefix token (ATS): the CLS token's attention to it times the L2 norm
       of its value vector (all heads), normalised to sum 1 over the non-prefix tokens.
    2. ``r = min(r, (N - P) // 2)`` (the reference's cap; it gives DeiT-S's 197 / 147 / 97 / 49).
    3. Per image: if the variance of the significances is below ``threshold`` (scores are flat, tokens
       alike) the image **pools**: ToMe bipartite matching on the keys averaged over heads, size-weighted
       means (:func:`~tokenreduce.core.bipartite_soft_matching`); otherwise it **prunes**: keeps the
       ``N - P - r`` most significant tokens, in descending order of significance, after the prefix.
    4. Both leave ``N - r`` tokens, so the count stays the same for the whole batch; the rule is chosen
       per image (:func:`~tokenreduce.core.choose_rows`) and sizes and sources follow the chosen one.

    Defaults = the reference's off-the-shelf DeiT-S run (``eval.sh``: ``--r_tokens 50 --pp_loc_list 3 6 9
    --threshold 7e-5``, proportional attention on): ``r=50`` at blocks 3, 6 and 9 of a 12-block model
    (``layers=None``, scaled to the depth), ``threshold=7e-5``, ``prop_attn=True``. DeiT-S: 197 -> 147 ->
    97 -> 49 tokens, 2.944 GMACs, 79.50 top-1 (README).

    Choices and departures:

    - Prefix tokens: the reference protects only the CLS token (forced score 2) in the pruning branch,
      so a distilled DeiT's distillation token is ranked, normalised and possibly pruned like a patch
      (its distillation flag reaches only the pooling branch). Here every prefix token (CLS,
      distillation, registers) is left out of the significances and kept in front in both branches;
      with only a CLS token this is the reference exactly.
    - The variance is the unbiased one (``torch.var``), as in the reference; the CLS row is averaged
      over heads instead of summed (the normalisation in step 1 cancels the factor).
    - Needs a class token (its attention row scores the tokens).
    """

    name = "ppt"
    paper = "Wu et al., PPT: Token Pruning and Pooling for Efficient Vision Transformers, arXiv 2310.01812"
    budget = Budget("r", 0, 1 << 16, integer=True, increasing=False)

    r: int = 50  # tokens removed at each reduction block (at most half of the non-prefix tokens)
    threshold: float = 7e-5  # significance variance below which an image pools instead of pruning
    layers: Sequence[int] | None = None  # reduction blocks; None: 3, 6, 9 of a 12-block model, scaled
    prop_attn: bool = True  # add log(size) to the attention logits

    needs_cls_token = True

    def __post_init__(self) -> None:
        self.r = as_int("r", self.r, 0)
        self.threshold = as_real("threshold", self.threshold, 0)
        self.layers = as_layers(self.layers)
        self.prop_attn = as_bool("prop_attn", self.prop_attn)

    def schedule(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        layers = set(layers_for_depth(self.layers, depth))
        n, out = num_tokens, []
        for layer in range(depth):
            if layer in layers:
                n -= min(self.r, (n - num_prefix) // 2)
            out.append(n)
        return out

    def select(self, x: Tensor, ctx: LayerContext) -> Selection | None:
        n, p = x.shape[1], ctx.num_prefix
        r = n - ctx.num_out
        if r == 0:
            return None
        v_norm = ctx.v.float().pow(2).sum(dim=(1, 3)).sqrt()  # [B, N]: values of all heads concatenated
        significance = (ctx.cls_attention() * v_norm)[:, p:]
        significance = significance / significance.sum(dim=1, keepdim=True)
        pool = significance.var(dim=1) < self.threshold
        pooled = bipartite_soft_matching(ctx.metric(), r, p, ctx.size)
        pruned = keep(keep_indices(significance, n - p - r, p), n)
        return choose_rows(pool, pooled, pruned)
