"""``dymu``: DyMU in a VLM (Wang et al., "DyMU: Dynamic Merging and Virtual Unmerging for Efficient
VLMs", arXiv 2504.17040): ``dtome`` in the vision tower, then virtual token unmerging in the LLM."""

from __future__ import annotations

from dataclasses import dataclass

from tokenreduce.methods.dtome import DToMe
from tokenreduce.registry import register_method
from tokenreduce.stages import Stage


@register_method
@dataclass
class DyMU(DToMe):
    """Dynamic merging in the vision tower (``dtome``, same ``thresholds`` and ``max_r``: see there and
    ``tokenreduce calibrate``), so each image reaches the LLM with its own number of tokens; with
    ``unmerge`` (the default), virtual token unmerging (VTU) in every attention layer of the LLM.

    Per-image counts: each prompt's image span shrinks to the image's merged tokens, rows are
    re-padded (a batch equals its rows alone). Each merged token keeps the patches it stands for
    (``tokenreduce.record(vlm).images[i].owner``).

    VTU (reference: ``LLaVA/llava/model/language_model/llava_llama.py``, ``CustomLlamaAttention``,
    its default "faster version but with direct token expansion", commit c57d75a): the decoder layers
    run on the merged sequence (norms, MLP, residuals at the merged length ``N'``), but each
    self-attention runs on the full prompt (length ``N``) as if every patch were present. With ``M``
    the ``N x N'`` 0/1 map from places to merged tokens (text tokens are their own single place), the
    merged hidden states ``e`` are spread back as ``M e``; queries, keys and values are projected,
    rotated with each place's own RoPE position and attended with the model's own attention function
    (SDPA kept) under the full prompt's causal and padding mask, ``f(Me)``; each merged token's output
    is the mean over its places, ``(MᵀM)⁻¹Mᵀ f(Me)`` (the reference's ``scatter_mean``). The paper's
    text was not available here: the formulas are those of the reference's exact-VTU file, whose
    comments write ``f(e) = smax( A/√D ) V`` and ``f'(e) = (M^T M)^{-1} M^T f(e)``; its exact path
    decomposes ``A`` without expanding (eager attention only) and is not implemented. A merge map of
    singletons is the unpatched model (bit for bit, tested).

    Decode (as the reference, whose cache stores the expanded keys and values): the prefill's cache
    holds a key and value for every place (its merged token's, rotated at the place's position), so
    the KV cache has the full prompt's length, generated tokens continue the full prompt's positions,
    and decode steps are the unpatched model's attention over that cache. What shrinks is the vision
    tower after each merge and, in the LLM, every part of a decoder layer but attention (norms, MLP,
    residual stream at ``N'``); attention and the cache keep the full length.

    ``unmerge=False``: the LLM reads the merged tokens as any shortened prompt (consecutive position
    ids on LLaVA), DyMU without VTU (the paper's ablation).

    ``dymu`` applies to whole VLMs only (stage ``llm``, as a stack of a vision-side and an in-LLM
    method); on a vision tower alone use ``dtome``.

    Departures: the reference gathers the projected queries, keys and values; here the hidden states
    are gathered before the model's own attention module projects them (the same numbers: a row-wise
    linear map commutes with the gather) and the mean is taken after the output projection (linear:
    the same as before it), so no attention code is copied, at the cost of the four projections at
    the full length. The reference handles one prompt (a 1-D map, batch 1); here every row has its
    own map and padding is masked. Only text models whose layers all use full attention (Llama,
    Qwen2 without sliding windows) and VLMs with one span per image and a token-wise projector
    (LLaVA) are supported; AnyRes packing of per-crop counts (the reference's LLaVA-OneVision path)
    is not.
    """

    name = "dymu"
    stage = Stage.LLM  # a VLM method (its vision-tower half alone is ``dtome``), as a stack of two stages is

    unmerge: bool = True  # virtual token unmerging in the LLM's attention (False: the LLM reads merged tokens)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.unmerge, bool):
            raise TypeError(f"unmerge must be True or False, got {self.unmerge!r}")

    @property
    def unmerges_in_llm(self) -> bool:
        return self.unmerge
