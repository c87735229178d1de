"""``diffrate``: DiffRate's searched prune-and-merge schedules (Chen et al., "DiffRate: Differentiable
Compression Rate for Efficient Vision Transformers", ICCV 2023), applied training-free."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import torch
from torch import Tensor

from tokenreduce.core import Selection, keep, keep_indices, merge_into_nearest
from tokenreduce.methods.base import EncoderMethod, LayerContext
from tokenreduce.registry import register_method
from tokenreduce.validate import as_bool, as_int_tuple

# The released schedule a model of this depth gets by default: the reference's headline setting for
# the model family of that depth (DeiT-S 2.9 G: 79.54 top-1; MAE ViT-L 42.3 G; MAE ViT-H 103.4 G).
DEFAULT_BY_DEPTH = {12: "deit-s-2.9", 24: "mae-l-42.3", 32: "mae-h-103.4"}
DEFAULT = "deit-s-2.9"  # stretched over any other depth


def _load() -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    text = resources.files("tokenreduce.methods").joinpath("data/diffrate_schedules.json").read_text()
    return {name: (tuple(s["prune"]), tuple(s["merge"])) for name, s in json.loads(text)["schedules"].items()}


# Name -> (prune, merge) kept-token lists per block, class token included, as released in
# OpenGVLab/DiffRate compression_rate.json (commit and file recorded in data/diffrate_schedules.json).
RELEASED = _load()


@register_method
@dataclass
class DiffRate(EncoderMethod):
    """Sort the tokens by CLS attention, prune the tail, merge the next tail into the most similar kept
    tokens, with per-block counts searched by DiffRate.

    In every block, after attention (reference ``OpenGVLab/DiffRate`` at 91ae3e3, ``DiffRate/patch/deit.py``
    inference path, ``DiffRate/merge.py``):

    1. Sort the non-prefix tokens by the CLS token's attention (head mean), descending.
    2. **Prune**: keep the first ``prune[l]`` tokens (prefix included).
    3. **Merge**: the kept tokens after the first ``merge[l]`` each merge into the token among those
       first ``merge[l]`` (prefix tokens excluded) they are most cosine-similar to, on the hidden states.
       The reference averages a destination and its sources **unweighted** (a scatter mean that includes
       the destination), and adds each source's size **times its similarity** to the destination's, so
       proportional attention (always on) sees similarity-discounted sizes. ``size_weighted=True`` is the
       paper-style merge instead: size-weighted means, sizes add.
    4. Block 0 never compresses (its searched rate is fixed at keep-all). The count after block ``l`` is
       ``min(previous, prune[l], merge[l])``; a list entry above the current count does nothing.

    Schedules: ``schedule_name=`` one of the released ones (:data:`RELEASED`: ``deit-t-0.6`` .. ``1.0``,
    ``deit-s-2.3`` / ``2.5`` / ``2.7`` / ``2.9`` / ``3.1``, ``deit-b-8.7`` .. ``12.5``, ``mae-b-8.7`` ..
    ``11.5``, ``mae-l-31.0`` .. ``46.1`` (24 blocks), ``mae-h-83.7`` .. ``124.5`` (32 blocks); names carry
    the GFLOPs target), or a custom ``prune=[...], merge=[...]`` pair: one kept count per block, prefix
    tokens included, each at least ``P + 1``, block 0's at least ``N``; as in the reference, a count above
    the tokens a block has keeps them all. A custom pair that does not fit the model (another depth, too
    few tokens, block 0 compressing) raises. Default (``schedule_name=None``): the released schedule for
    the model's depth (12 blocks: ``deit-s-2.9``, the reference's headline, 79.54 top-1 at 2.905 GMACs on
    DeiT-S; 24: ``mae-l-42.3``; 32: ``mae-h-103.4``; any other depth: ``deit-s-2.9``). The width, which
    tells DeiT-S from DeiT-B, is not known when planning, so a 12-block ViT-B gets ``deit-s-2.9`` too;
    pass ``schedule_name="deit-b-11.5"`` for the DeiT-B search.

    A released schedule on another model: the lists are searched for ``M0`` patch tokens (196, ViT-H
    256) behind one class token and ``L0`` blocks. They are used as fractions of the patch tokens, the
    rule chosen here: block ``i`` of a ``depth``-block model with ``M`` patch tokens and ``P`` prefix
    tokens keeps ``P + ceil(f((i + 1) / depth) * M)`` (at least one patch), where ``f`` is the
    piecewise-linear curve through ``(0, 1)`` and ``((l + 1) / L0, (kept[l] - 1) / M0)`` (exact integer
    arithmetic). With the same patch count and depth this is the released list exactly (the class token
    counted as the prefix); resolution and depth only stretch it. DeiT-S 2.9 on DINOv2 ViT-S/14 at
    518 px (1369 patches) keeps 1370 -> 1350 -> ... -> 386 -> 15 tokens.

    Departures: every prefix token (CLS, distillation, registers) stays in front, is never pruned and
    never receives a merge (the reference protects only the CLS token: a distillation token is sorted
    and pruned like a patch). Blocks that keep every token leave them in place (the reference sorts
    them by CLS attention anyway; attention and the MLP do not depend on the order). A negative best
    similarity (not seen on trained models) would shrink the destination's size, possibly below 0 and
    to a NaN logit: the discount is clamped at 0. Needs a class token.
    """

    name = "diffrate"
    paper = "Chen et al., DiffRate: Differentiable Compression Rate for Efficient Vision Transformers, ICCV 2023"

    schedule_name: str | None = None  # a released schedule by name; None: the one for the model's depth
    prune: Sequence[int] | None = None  # custom kept-token counts per block after pruning (with merge)
    merge: Sequence[int] | None = None  # custom kept-token counts per block after merging (with prune)
    size_weighted: bool = False  # paper-style size-weighted merge instead of the reference's unweighted mean

    budget = None  # no numeric knob: the compute is set by a searched schedule (by name or lists)
    prop_attn = True  # always on in DiffRate
    needs_cls_token = True

    def __post_init__(self) -> None:
        self.size_weighted = as_bool("size_weighted", self.size_weighted)
        custom = self.prune is not None or self.merge is not None
        if custom:
            if self.schedule_name is not None:
                raise ValueError(f"pass schedule_name or a custom prune/merge pair, not both (got {self.schedule_name!r})")
            if self.prune is None or self.merge is None:
                raise ValueError("a custom schedule needs both prune and merge: one kept-token count per block each")
            self.prune = as_int_tuple("prune", self.prune, 1)
            self.merge = as_int_tuple("merge", self.merge, 1)
            if len(self.prune) != len(self.merge):
                raise ValueError(
                    f"prune and merge must have one entry per block each, got {len(self.prune)} and {len(self.merge)}"
                )
        elif self.schedule_name is not None and self.schedule_name not in RELEASED:
            raise ValueError(f"schedule_name must be one of {sorted(RELEASED)} or None, got {self.schedule_name!r}")

    def kept_counts(self, num_tokens: int, num_prefix: int, depth: int) -> tuple[list[int], list[int]]:
        """The prune and merge kept-token lists for this model, prefix tokens included."""
        if self.prune is not None:
            return self._custom(num_tokens, num_prefix, depth)
        name = self.schedule_name or DEFAULT_BY_DEPTH.get(depth, DEFAULT)
        return tuple(_stretch(released, depth, num_tokens - num_prefix, num_prefix) for released in RELEASED[name])  # type: ignore[return-value]

    def _custom(self, num_tokens: int, num_prefix: int, depth: int) -> tuple[list[int], list[int]]:
        for name, counts in (("prune", self.prune), ("merge", self.merge)):
            if len(counts) != depth:
                raise ValueError(f"{name} must have one kept-token count per block ({depth} for this model), got {len(counts)}")
            bad = [c for c in counts if c <= num_prefix]
            if bad:
                raise ValueError(f"{name} counts must be >= {num_prefix + 1} (the prefix tokens and one more), got {bad}")
            if counts[0] < num_tokens:
                raise ValueError(
                    f"{name}[0] must be >= {num_tokens}, the input token count: DiffRate never compresses the first block; "
                    f"got {counts[0]}"
                )
        return list(self.prune), list(self.merge)

    def plan(self, num_tokens: int, num_prefix: int, depth: int) -> list[tuple[int, int]]:
        """``(after pruning, after merging)`` token counts of every block."""
        n, out = num_tokens, []
        for layer, (prune, merge) in enumerate(zip(*self.kept_counts(num_tokens, num_prefix, depth))):
            pruned = n if layer == 0 else min(n, prune)
            n = min(pruned, merge) if layer else n
            out.append((pruned, n))
        return out

    def schedule(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        return [merged for _, merged in self.plan(num_tokens, num_prefix, depth)]

    def select(self, x: Tensor, ctx: LayerContext) -> Selection | None:
        n, p = x.shape[1], ctx.num_prefix
        pruned, merged = self.plan(ctx.input_tokens, p, ctx.depth)[ctx.layer]
        if merged == n:
            return None
        order = keep_indices(ctx.cls_attention()[:, p:], pruned - p, p)  # prefix, then by CLS attention
        if merged == pruned:
            return keep(order, n)
        slot, similarity = merge_into_nearest(x, order[:, :merged], order[:, merged:], n, p)
        if self.size_weighted:
            return Selection(slot, order[:, :merged], ctx.sizes(x)[..., 0], mean=True)
        discount = torch.ones(slot.shape, device=x.device).scatter(1, order[:, merged:], similarity.clamp(min=0))
        return Selection(slot, order[:, :merged], mean=True, size_coeff=discount)  # unweighted means


def _stretch(released: Sequence[int], depth: int, patches: int, num_prefix: int) -> list[int]:
    """Kept tokens after each of ``depth`` blocks for ``patches`` patch tokens behind ``num_prefix``
    prefix tokens: ``num_prefix + ceil(f * patches)`` (at least one patch), with ``f`` read off the
    piecewise-linear curve through ``(0, 1)`` and ``((l + 1) / L0, (released[l] - 1) / M0)`` of a released
    list (``M0 = released[0] - 1`` patches behind one class token, ``L0`` blocks). Integer arithmetic only:
    exact, and plain Python for ``torch.compile`` to fold."""
    blocks, released_patches = len(released), released[0] - 1
    points = [released_patches] + [k - 1 for k in released]  # f at 0, 1, .., L0 blocks, times M0
    out = []
    for i in range(depth):
        lo, rem = divmod((i + 1) * blocks, depth)  # position on the released curve: lo + rem / depth blocks
        upper = points[lo] if rem == 0 else points[lo + 1]
        numerator = points[lo] * depth + (upper - points[lo]) * rem  # f = numerator / (M0 * depth)
        out.append(num_prefix + max(1, -(-numerator * patches // (released_patches * depth))))
    return out
