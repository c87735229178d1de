"""``dtome``: DyMU's dynamic token merging (Wang et al., "DyMU: Dynamic Merging and Virtual Unmerging for
Efficient VLMs", arXiv 2504.17040), and the calibration that finds its thresholds."""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from tokenreduce.core import Selection, batch_soft_matching, threshold_soft_matching
from tokenreduce.methods.base import EncoderMethod, LayerContext
from tokenreduce.methods.rschedule import RSpec, check_r, per_layer_r
from tokenreduce.registry import register_method
from tokenreduce.validate import as_int, as_real, as_sequence, read_json_file

Thresholds = str | os.PathLike | float | Sequence[float | None]
FORMAT = "dtome-thresholds"  # the "format" field of the files `tokenreduce calibrate` writes


def read_thresholds(path: str | os.PathLike) -> list[float | None]:
    """The per-block thresholds of a file written by ``tokenreduce calibrate`` (``None``: no merging there)."""
    data = read_json_file(path, "thresholds file")
    if not isinstance(data, dict) or data.get("format") != FORMAT or "thresholds" not in data:
        raise ValueError(f"thresholds file {str(path)!r} was not written by `tokenreduce calibrate` (no {FORMAT!r} format)")
    return _check_thresholds(data["thresholds"], f"thresholds in {str(path)!r}")


def _check_thresholds(values: object, name: str) -> list[float | None]:
    items = as_sequence(name, values, "cosine similarities in [-1, 1] or None")
    return [None if v is None else as_real(f"{name}[{i}]", v, -1, 1) for i, v in enumerate(items)]


def _per_block(value, depth: int, name: str) -> None:
    if isinstance(value, list) and len(value) != depth:
        raise ValueError(f"{name} as a list must have one entry per block ({depth}), got {len(value)}")


def _at(value, layer: int):
    return value[layer] if isinstance(value, list) else value


@register_method
@dataclass
class DToMe(EncoderMethod):
    """After each block's attention, merge every ToMe edge (set A = even positions, B = odd, each A token to
    its most cosine-similar B token on the keys averaged over heads) whose similarity exceeds the block's
    threshold, per image: images of one batch leave a block with different counts.

    ``thresholds``: one per block (``None``: no merging in that block), one for all blocks, or the JSON
    file ``tokenreduce calibrate`` writes (DyMU's batch-level calibration on your images for a target r
    schedule). There is no default: thresholds belong to a model and a target, so ``dtome`` without them
    raises at the first forward. ``max_r`` caps the merges per image (an int or one per block; DyMU's
    ``max_r_per_instance_ratio`` is ``max_r = [int(ratio * r) for r in the calibration's r]``).

    As the reference (``src/open_clip/tome.py``, commit c57d75a): at most half of an image's non-prefix
    tokens merge in a block, the most similar edges first; merges are size-weighted means (sizes add
    up); proportional attention (``log(size)`` on the logits) is always on; prefix tokens are protected
    (A rows and B columns masked as in ``tome``) and stay in front; each image's tokens are ordered
    ``[prefix, unmerged A, B]``; similarity must be strictly above the threshold.

    Batches: each image is merged exactly as it would be alone, and rows are padded to the longest with
    tokens of size 0 after the real ones (``Record.size == 0`` marks them; DyMU pads with an additive
    ``finfo.min`` mask and re-sorts the same way). Proportional attention's ``log(0) = -inf`` masks them as
    keys, size-weighted pooling skips them (a SigLIP tower's attention-pooling head masks them too), and
    no original token maps to them. ``Record.tokens_per_layer`` gives the padded lengths; the schedule
    gives upper bounds (no merging). A batch of one has no padding. The counts come from the data, so
    ``dtome`` runs eagerly: ``torch.compile(fullgraph=True)``, ``torch.export`` and ONNX cannot hold it.

    Departures: similarities are computed in float32 whatever the model's dtype; DyMU's batch path (B > 1)
    does not apply the 50% cap its single-image path applies (the two differ only for an odd token count
    without a class token); without prefix tokens DyMU's single-image path leaves the unmerged A tokens in
    score order, here they are in position order as with prefix tokens (outputs are the same, only the
    token order differs); ``prop_attn`` is not optional here (DyMU's flag defaults to on), since it is what
    masks the padding. A SigLIP tower's pooling head is not size-weighted (DyMU's
    ``AttentionPoolLatentWMasking`` adds ``log(size)`` there). Calibrated thresholds are a mean over
    batches, so the batch size matters (DyMU's script: 64 per GPU, ``tokenreduce calibrate``'s default).
    """

    name = "dtome"
    paper = "Wang et al., DyMU: Dynamic Merging and Virtual Unmerging for Efficient VLMs, arXiv 2504.17040"

    thresholds: Thresholds | None = None  # per block (None: no merging there), one for all, or a calibrate file
    max_r: int | Sequence[int] | None = None  # at most this many merges per image (per block when a list)

    prop_attn: ClassVar[bool] = True
    variable_counts: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.thresholds, (str, os.PathLike)):
            self.thresholds = read_thresholds(self.thresholds)
        elif isinstance(self.thresholds, numbers.Real) or getattr(self.thresholds, "ndim", None) == 0:
            self.thresholds = as_real("thresholds", self.thresholds, -1, 1)
        elif self.thresholds is not None:
            self.thresholds = _check_thresholds(self.thresholds, "thresholds")
        if isinstance(self.max_r, numbers.Integral) or getattr(self.max_r, "ndim", None) == 0:
            self.max_r = as_int("max_r", self.max_r, 0)
        elif self.max_r is not None:
            self.max_r = [as_int(f"max_r[{i}]", v, 0) for i, v in enumerate(as_sequence("max_r", self.max_r, "integers >= 0"))]

    def schedule(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        _per_block(self.thresholds, depth, "thresholds")
        _per_block(self.max_r, depth, "max_r")
        return [num_tokens] * depth

    def select(self, x: Tensor, ctx: LayerContext) -> Selection | None:
        if self.thresholds is None:
            raise ValueError(
                "dtome has no thresholds: pass thresholds=[one per block] or the JSON file that "
                "`tokenreduce calibrate` writes for this model (thresholds='file.json')"
            )
        threshold, cap = _at(self.thresholds, ctx.layer), _at(self.max_r, ctx.layer)
        if threshold is None or cap == 0:
            return None
        return threshold_soft_matching(ctx.metric().float(), threshold, ctx.num_prefix, ctx.size, cap)


@dataclass
class DToMeCalibration(EncoderMethod):
    """DyMU's calibration pass (not registered; :func:`calibrate` applies it): in block ``i``, the
    ``r[i] * B`` most similar edges of the whole batch merge, and the similarity of the best edge left
    unmerged is recorded in the forward's ``carry`` (``{block: 0-d tensor}``)."""

    name = "dtome-calibration"
    paper = DToMe.paper

    r: tuple[int, ...] = ()

    prop_attn: ClassVar[bool] = True
    variable_counts: ClassVar[bool] = True

    def schedule(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        if len(self.r) != depth:
            raise ValueError(f"r must have one entry per block ({depth}), got {len(self.r)}")
        return [num_tokens] * depth

    def select(self, x: Tensor, ctx: LayerContext) -> Selection | None:
        selection, threshold = batch_soft_matching(ctx.metric().float(), self.r[ctx.layer], ctx.num_prefix, ctx.size)
        if threshold is not None:
            ctx.carry = {**(ctx.carry or {}), ctx.layer: threshold}
        return selection


def calibrate(
    model: nn.Module,
    batches: Iterable[Tensor],
    r: RSpec | None = None,
    keep_ratio: float | None = None,
    progress: Callable[[int], object] | None = None,
) -> dict:
    """DyMU's thresholds for ``dtome`` on ``model`` (a timm ViT or a Hugging Face vision tower) from image
    ``batches`` (each ``[B, 3, H, W]``, normalised as the model expects), for a target merge schedule:
    ``r`` or ``keep_ratio`` as in ``tome``.

    In every batch and block the ``r_i * B`` most similar ToMe edges of the whole batch merge (DyMU's
    ``batch_level_bipartite_soft_matching``); the block's threshold for that batch is the similarity of the
    best edge left unmerged, clamped at 0; the result is the mean over batches (DyMU's running mean).
    Blocks with ``r_i = 0`` get ``None`` (no merging). Deterministic for a given order of batches.

    Returns the dict ``tokenreduce calibrate`` writes as JSON: ``thresholds``, ``r``, ``images``,
    ``batches``, ``input_tokens``, ``tokenreduce`` (the version) and ``format``. Pass its ``thresholds`` (or
    the file) to ``apply(model, "dtome", thresholds=...)``.
    """
    import tokenreduce
    from tokenreduce.adapters import locate
    from tokenreduce.api import patch_of

    _, target, adapter = locate(model)
    depth, prefix = len(adapter.blocks(target)), adapter.num_prefix_tokens(target)
    r, keep_ratio = check_r(r, keep_ratio, None)
    n0 = adapter.default_num_tokens(target)
    if keep_ratio is not None and n0 is None:
        raise ValueError("keep_ratio needs a model with a fixed input size; pass r instead")
    schedule = per_layer_r(r, keep_ratio, (n0 or prefix) - prefix, depth)
    totals: list[float] = [0.0] * depth
    seen = [0] * depth
    images = count = 0
    input_tokens = None
    with tokenreduce.applied(model, DToMeCalibration(tuple(schedule))), torch.no_grad():
        for x in batches:
            model(x)
            state = patch_of(model).latest()
            for layer, threshold in (state.carry or {}).items():
                totals[layer] += float(threshold)
                seen[layer] += 1
            images, count, input_tokens = images + x.shape[0], count + 1, state.input_tokens
            if progress is not None:
                progress(1)
    if count == 0:
        raise ValueError("calibrate needs at least one batch of images")
    thresholds = [totals[i] / seen[i] if seen[i] else None for i in range(depth)]
    return dict(
        format=FORMAT,
        thresholds=thresholds,
        r=schedule,
        images=images,
        batches=count,
        input_tokens=input_tokens,
        tokenreduce=tokenreduce.__version__,
    )


def write_thresholds(path: str | os.PathLike, calibration: dict) -> None:
    """Write :func:`calibrate`'s result (plus any fields added to it) as JSON; ``None`` becomes ``null``."""
    if any(t is not None and not math.isfinite(t) for t in calibration["thresholds"]):
        raise ValueError("thresholds must be finite")
    with open(path, "w") as f:
        json.dump(calibration, f, indent=2)
        f.write("\n")
