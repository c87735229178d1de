"""``zoo_prune``: ZOO-Prune ("ZOO-Prune: Training-Free Token Pruning via Zeroth-Order Gradient Estimation
in Vision-Language Models", CVPR 2026, arXiv 2509.24837). Paper only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenreduce.core import Selection, hash_normal, keep, salient_dissimilar_subset
from tokenreduce.methods.visual import VisualContext, VisualMethod
from tokenreduce.registry import register_method
from tokenreduce.validate import as_int, as_real

HASH_LIMIT = 2**26  # hash_normal draws fewer deviates than this per call


@register_method
@dataclass
class ZOOPrune(VisualMethod):
    """Keep the tokens whose projector output moves most under small random input perturbations,
    skipping tokens too similar to ones already kept.

    Paper only (the spec §5: "pre-LLM: token sensitivity = change of the **projector** output under
    small random perturbations (forward-only), combined with diversity-aware selection"; "up to 94.4%
    pruned"). The rule as implemented, on each image's vision features ``x [n, C]`` (the ones the
    projector ``P`` reads; a class token is never kept, as LLaVA's default strategy drops it):

    1. Sensitivity, a zeroth-order estimate of the projector's local gradient magnitude from forward
       passes only: ``s_i = mean_k ||P(x_i + eps * sigma * u_ik) - P(x_i)|| / (eps * sigma)`` over
       ``samples`` perturbations ``u_k [n, C]`` of standard normal deviates.
    2. Diversity-aware selection: tokens taken in decreasing ``s_i``, each only if its cosine
       similarity to every kept token (on the projected tokens ``P(x)``, what the LLM reads) is at most
       ``similarity``; if fewer than the budget pass, the most sensitive skipped ones fill up
       (:func:`~tokenreduce.core.salient_dissimilar_subset`). Kept tokens go to the LLM in their
       original order.

    Choices the paper leaves open (ours):
    - Perturbation size ``eps=0.05`` relative to ``sigma``, the RMS of the image's features (one scale
      per image, so every token of an image is perturbed by the same amount and the rule does not
      depend on the encoder's feature scale); ``samples=8``.
    - The noise is counter-based (:func:`~tokenreduce.core.hash_normal` of ``seed``): the same on every
      call, every device and for every image of a batch, so a batch selects what its rows select alone.
      All samples run as one projector call on ``samples`` stacked copies.
    - Sensitivity is the per-token norm of the output change (the projector is token-wise, so
      perturbing every token at once still measures each token alone), computed in float32.
    - Diversity as a similarity bound with greedy fill-up (``similarity=0.9``), not a weighted
      objective.
    - Budget: ``keep_ratio`` default 64/576 (88.9% pruned, a common setting of this literature; the
      paper's own default is not recorded), or ``keep_tokens``.

    Needs the VLM's projector on vision features: LLaVA-family models (token-wise projector); other
    families raise a ``TypeError``.
    """

    name = "zoo_prune"
    paper = (
        "ZOO-Prune: Training-Free Token Pruning via Zeroth-Order Gradient Estimation in Vision-Language Models, "
        "CVPR 2026, arXiv 2509.24837"
    )
    space = "vision"
    needs_projector = True
    default_keep_ratio = 64 / 576

    eps: float = 0.05  # perturbation size, relative to the RMS of the image's features
    samples: int = 8  # random perturbations (projector forward passes, run as one batch)
    similarity: float = 0.9  # the cosine above which a token is too similar to a kept one
    seed: int = 0  # key of the counter-based noise

    def __post_init__(self) -> None:
        super().__post_init__()
        self.eps = as_real("eps", self.eps, 0, None, low_open=True)
        self.samples = as_int("samples", self.samples, 1)
        self.similarity = as_real("similarity", self.similarity, -1, 1)
        self.seed = as_int("seed", self.seed, 0, 2**32 - 1)

    def select(self, ctx: VisualContext) -> Selection:
        project = ctx.projector(self.name)
        x = ctx.features[:, ctx.num_prefix :]
        m, n, c = x.shape
        if self.samples * n * c >= HASH_LIMIT:
            raise ValueError(f"samples must be below {HASH_LIMIT // (n * c)} for {n} tokens of width {c}, got {self.samples}")
        noise = hash_normal(self.samples * n * c, self.seed, x.device).view(self.samples, 1, n, c)
        step = self.eps * x.float().pow(2).mean(dim=(1, 2)).sqrt()[None, :, None, None]  # [1, M, 1, 1]
        with torch.no_grad():
            base = project(x)
            moved = project((x.float()[None] + step * noise).to(x.dtype).flatten(0, 1))
        change = (moved.float().view(self.samples, m, n, -1) - base.float()[None]).norm(dim=-1)
        sensitivity = (change / step[..., 0]).mean(dim=0)  # [M, n]
        picked = torch.stack([salient_dissimilar_subset(s, b, ctx.keep, self.similarity) for s, b in zip(sensitivity, base)])
        return keep(picked.sort(dim=1).values + ctx.num_prefix, ctx.features.shape[1])
