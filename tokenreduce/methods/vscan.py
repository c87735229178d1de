"""``vscan``: VScan (Zhang et al., "VScan: Rethinking Visual Token Reduction for Efficient Large
Vision-Language Models", arXiv 2505.22654, TMLR 2026)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenreduce.core import Selection, cls_attention, merge_into_nearest, weighted_mean_coeff
from tokenreduce.methods.pdrop import PyramidDrop
from tokenreduce.methods.stack import PresetStack
from tokenreduce.methods.visual import VisualContext, VisualMethod
from tokenreduce.registry import loadable, register_method
from tokenreduce.validate import as_int, as_real

REFERENCE_DEPTH = 24  # CLIP ViT-L/14-336 of LLaVA-1.5, whose layer 5 the local scan reads
REFERENCE_SHALLOW = 5
PAPER = "Zhang et al., VScan: Rethinking Visual Token Reduction for Efficient Large Vision-Language Models, TMLR 2026"


@loadable
@dataclass
class VScanScans(VisualMethod):
    """VScan's global and local scans in the vision encoder, then merging. Built by :class:`VScan`.

    Of the ``keep_tokens`` (T) per image: local, ``int(T * (1 - global_share)) // windows`` per
    ``window x window`` window of the patch grid (non-overlapping, row-major; rows and columns past
    the last whole window are in none), the patches the class token attends to most at the shallow
    layer; global, the ``T - int(T * (1 - global_share))`` others it attends to most at the layer the
    VLM reads (class-token softmax row, mean over heads). Every other patch joins the kept patch it is
    most cosine-similar to; an output is the mean of its kept patch and those joining it; kept
    patches stay in position order; the class token is not passed on."""

    name = "vscan_scans"
    paper = PAPER
    space = "vision"
    needs_attention = True
    default_keep_ratio = None

    global_share: float = 0.5
    window: int = 6
    shallow: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keep_tokens is None:
            raise ValueError("vscan's scans need keep_tokens (the tokens each image keeps before the LLM)")
        self.global_share = as_real("global_share", self.global_share, 0, 1)
        self.window = as_int("window", self.window, 1)
        if self.shallow is not None:
            self.shallow = as_int("shallow", self.shallow, 0)

    def shallow_layer(self, depth: int) -> int:
        layer = REFERENCE_SHALLOW * depth // REFERENCE_DEPTH if self.shallow is None else self.shallow
        if layer >= depth:
            raise ValueError(f"shallow must be in [0, {depth - 1}] for a vision tower of {depth} layers, got {layer}")
        return layer

    def _windows(self, grid: tuple[int, int] | None) -> int:
        if grid is None or grid[0] < self.window or grid[1] < self.window:
            raise ValueError(f"window must fit the patch grid ({grid}) for vscan's local scan, got {self.window}")
        return (grid[0] // self.window) * (grid[1] // self.window)

    def _split(self, grid: tuple[int, int] | None) -> tuple[int, int]:
        """``(patches per window, global patches)``."""
        local = int(self.keep_tokens * (1 - self.global_share))
        return local // self._windows(grid), self.keep_tokens - local

    def num_kept(self, num_tokens: int, grid: tuple[int, int] | None) -> int:
        per_window, global_count = self._split(grid)
        kept = per_window * self._windows(grid) + global_count
        if kept > num_tokens:
            raise ValueError(f"keep_tokens must be at most the {num_tokens} tokens of an image, got {self.keep_tokens}")
        return kept

    def select(self, ctx: VisualContext) -> Selection:
        if ctx.num_prefix != 1:
            raise ValueError("vscan's scans rank patches by the class token's attention; this vision tower has no class token")
        x = ctx.features
        m, n = x.shape[0], x.shape[1] - 1
        rows, cols = ctx.grid
        per_window, global_count = self._split(ctx.grid)
        w = self.window
        device = x.device
        # [windows, w * w]: the patch positions of each window, windows row-major
        corner = torch.arange(rows // w, device=device)[:, None] * w * cols + torch.arange(cols // w, device=device) * w
        corner = corner.flatten()
        inside = (torch.arange(w, device=device)[:, None] * cols + torch.arange(w, device=device)).flatten()
        windows = corner[:, None] + inside
        shallow = cls_attention(ctx.shallow_q, ctx.shallow_k, ctx.scale)[:, 1:]
        local = windows[None].expand(m, -1, -1).gather(2, shallow[:, windows].topk(per_window, dim=-1).indices).flatten(1)
        deep = cls_attention(ctx.q, ctx.k, ctx.scale)[:, 1:].scatter(1, local, float("-inf"))
        picked = torch.cat([local, deep.topk(global_count, dim=1).indices], dim=1).sort(dim=1).values + 1
        rest = torch.ones(m, n + 1, dtype=torch.bool, device=device).scatter(1, picked, False)
        rest[:, 0] = False  # the class token is not passed on
        others = rest.nonzero()[:, 1].view(m, -1)
        slot, _ = merge_into_nearest(x, picked, others, n + 1)
        return Selection(slot, picked, weighted_mean_coeff(slot, torch.ones_like(slot, dtype=torch.float), picked.shape[1]))


@register_method
@dataclass
class VScan(PresetStack):
    """Global and local scans with merging in the vision encoder (:class:`VScanScans`), then
    last-instruction attention pruning at a middle LLM layer (PyramidDrop's rule with one stage).

    From the reference (``Tencent/SelfEvolvingAgent`` ``VScan/llava/model/llava_arch.py``
    ``encode_images``, ``window_cls_selection``, ``token_merging``, and ``modeling_llama_x.py``):
    ``tokens=96`` kept per image before the LLM, half by the local scan at vision layer 5 of 24 in
    6x6 windows, half by the global scan at the layer the VLM reads, the rest merged into the most
    similar kept token (mean); then ``llm_tokens=32`` kept from LLM layer 16 of 32 (``layer=None``
    scales it to the model's depth: ``depth // 2``) by the last prompt token's attention at that
    layer's own queries and keys; positions re-indexed as the reference's (``positions="auto"``:
    Qwen's M-RoPE ids would keep theirs).

    Departures and choices the reference leaves open: the merge compares and averages the vision
    encoder's hidden states at the read layer, before the projector (the reference merges the
    projected tokens: the engine projects the tokens a vision-space method keeps, and the projector
    is not linear, so the merged tokens differ by its non-linearity); ``shallow=None`` scales layer 5
    of 24 to the tower's depth; ``window`` is fixed at 6 as the reference's 24x24 grid (pass a size
    that fits other grids); the global scan sets the local picks' scores to ``-inf`` (the reference
    zeroes them: the same picks, attention being positive); the LLM stage keeps the share
    ``llm_tokens / tokens`` of the tokens an image brings to the LLM (the same 32 when the scans keep 96;
    per AnyRes crop budgets add up over the crops). Only towers with a class token (CLIP); the
    reference's Qwen2.5-VL scans are not ported (the spec notes what they use is unknown).
    """

    name = "vscan"
    paper = PAPER

    tokens: int = 96
    llm_tokens: int = 32
    global_share: float = 0.5
    window: int = 6
    shallow: int | None = None
    layer: int | None = None
    positions: str = "auto"

    def __post_init__(self) -> None:
        self.tokens = as_int("tokens", self.tokens, 1)
        self.llm_tokens = as_int("llm_tokens", self.llm_tokens, 1, self.tokens)
        self.before = VScanScans(
            keep_tokens=self.tokens, global_share=self.global_share, window=self.window, shallow=self.shallow
        )
        layers = None if self.layer is None else (self.layer,)
        self.inside = PyramidDrop(layers=layers, ratios=(self.llm_tokens / self.tokens,), positions=self.positions)
        self.global_share, self.window, self.shallow = self.before.global_share, self.before.window, self.before.shallow
        super().__post_init__()
