"""Pruning inside a Hugging Face decoder stack during the prefill (transformers 5.x).

Facts relied on (the spec's hooking notes, checked on 5.24): the text model computes the attention
mask, the rotary tables and the position ids once and hands the same objects to every decoder layer,
called as ``layer(hidden, attention_mask=, position_ids=, cache=, use_cache=, position_embeddings=)``;
an attention module looks up its kernel by ``self.config._attn_implementation`` and calls it with
rotary-applied ``query [B, H, L, D]`` and ``key [B, H_kv, L, D]``; a dynamic cache stores whatever
length each layer gives it; attention modules store and read their entries through
``cache.update(key, value, layer_idx)``, which returns what the layer attends to, and a layer's stored
keys are ``cache.layers[i].keys``.

So a decoder-layer mixin shortens the hidden states at a pruning layer and hands every later layer
the mask, position ids and rotary tables cut to the kept tokens (re-padding rows that kept different
amounts); the scoring layer's attention module gets a config copy naming a registered kernel that
reads the one query row a method needs (or the keys), then calls the model's own kernel. A method
scoring with the pruning layer's own attention gets it before the layer runs, from the layer's input
norm, key projection for every token and query projection for the last prompt token only. On decode
steps the layers after a pruning layer get the mask's columns cut to their shorter cache.

A method may restore what a pruning layer ``a`` dropped before a later layer ``b``
(:meth:`~tokenreduce.methods.llm.LLMMethod.restore_layers`): layer ``a`` keeps its input, and before
``b`` the sequence becomes again the one ``a`` received, text tokens carried back to their places
and each image token rebuilt by the method. Layers ``a .. b-1`` and their KV cache hold the short
sequence, layers from ``b`` on the whole one (as it was before ``a``), with its position ids and
masks; decode steps follow the same per-layer lengths.

A method that selects cached entries on decode steps (DyCoke) prunes nothing at the prefill: the
cache's class is extended for that generate call (:class:`SelectedEntries`) so that every layer keeps
all its entries while, on decode steps, the layers from the method's layer on get the selected ones
(and the mask's columns to match); the selection is chosen from the previous layer's attention row,
recomputed from its query projection and cached keys after it ran (:class:`DecodeSelection`).

A masks-only method (:attr:`~tokenreduce.methods.llm.LLMMethod.masks_only`, AIM's reference setting)
removes nothing: at a pruning layer the tokens not kept are recorded as hidden columns per row, and
every later layer gets the model's own mask with those columns hidden (built causal where SDPA got
none), positions and sequence unchanged, every layer's cache full length; decode steps hide the same
columns of each layer's cache (the hidden columns are kept on the generate call's cache). The record's
per-layer lengths count the hidden tokens: every layer still computes them.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tokenreduce.core import Selection, row_attention, rows_attention
from tokenreduce.core.sequence import Compaction, SpanKeep, compact, hide_columns, hide_columns_keeping_rows
from tokenreduce.methods.llm import ImageSpan, LLMContext, LLMMethod, check_restores
from tokenreduce.patch import ATTR, Patch, original_class
from tokenreduce.registry import loadable

STAGES = "_tokenreduce_llm_stages"  # attribute on a generate call's cache: the prefill's pruning stages
SELECTION = "_tokenreduce_decode_selection"  # attribute on a generate call's cache: its decode-time selection
HIDDEN = "_tokenreduce_hidden_columns"  # attribute on a generate call's cache: a masks-only prefill's hidden columns
KERNEL = "tokenreduce_scoring"  # the attention implementation name of scoring layers


@dataclass(frozen=True)
class PruneStage:
    """A pruning layer and where its sequence came from: ``compaction`` maps the LLM's input sequence
    to the sequence of this layer and the next ones (until the next stage)."""

    layer: int
    compaction: Compaction


@dataclass(frozen=True)
class Pruned:
    """Kept on a generate call's cache after a pruned prefill, for the decode steps."""

    stages: tuple[PruneStage, ...]
    rotary: nn.Module


@dataclass(frozen=True)
class LLMStep:
    """What one pruning layer kept: per image, the indices of its visual tokens at the LLM's input."""

    layer: int
    kept: tuple[Tensor, ...]


@dataclass(frozen=True)
class Saved:
    """A pruning layer's input and the run's state before it, for the layer that restores its tokens."""

    hidden: Tensor
    spans: list[ImageSpan]
    origin: list[Tensor]
    owner: list[Tensor]
    mask: Tensor
    raters: list[Tensor] | None
    stages: tuple[PruneStage, ...]
    selections: list[Selection]
    step: Compaction  # the pruning layer's own: its input sequence to its output sequence


@dataclass
class LLMRun:
    """One prefill being pruned: the current sequence's images and 2-D mask, the stages done so far,
    the attention row captured for the next stage, and the real tokens each layer read."""

    method: LLMMethod
    layers: tuple[int, ...]
    reindex: bool
    rotary: nn.Module
    inputs: list[int]  # per image, its visual tokens at the LLM's input
    spans: list[ImageSpan]
    origin: list[Tensor]  # per image, the LLM-input index of each of its current tokens
    mask: Tensor
    stages: list[PruneStage] = field(default_factory=list)
    steps: list[LLMStep] = field(default_factory=list)
    lengths: list[tuple[int, ...]] = field(default_factory=list)
    norm: nn.Module | None = None
    owner: list[Tensor] = field(default_factory=list)  # per image, the current token covering each input token
    raters: list[Tensor] | None = None  # per image, its text raters' current positions
    attention: Tensor | None = None
    keys: Tensor | None = None
    queries: Tensor | None = None
    scale: float | None = None
    scores: list[Tensor] | None = None
    projected_keys: Tensor | None = None  # [B, L, D_kv] the scoring layer's key projection, before norms and rotary
    score_layer: int | None = None
    substitutes: dict[int, object] = field(default_factory=dict)
    restores: dict[int, int] = field(default_factory=dict)  # restoring layer -> the pruning layer it undoes
    saved: dict[int, Saved] = field(default_factory=dict)  # by pruning layer, until its tokens come back
    pruned: int = 0  # pruning layers passed
    memory: list = field(default_factory=list)  # per image, what the method carries between its stages
    masked: Tensor | None = None  # [B, L] masks-only methods: the tokens hidden so far
    hidden: list[tuple[int, Tensor]] = field(default_factory=list)  # (pruning layer, its `masked`) per stage

    def visible(self) -> Tensor:
        """``[B, L]`` 1 on the real tokens later queries may attend to (masks-only: those not hidden)."""
        return self.mask if self.masked is None else self.mask * ~self.masked

    def next_score_layer(self) -> int | None:
        """The layer whose attention kernel reads the next stage's scores (``"own"`` scores are computed
        by :func:`_own_attention` instead)."""
        stage = self.pruned
        if stage == len(self.layers) or self.method.scores_from == "own" or self.method.scores == "none":
            return None
        return self.layers[stage] - 1


def _run(module: nn.Module) -> LLMRun | None:
    thread = getattr(getattr(module, ATTR).local, "vlm", None)
    return None if thread is None else thread.llm


def _scoring_kernel(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    run = _run(module)
    if run is not None and run.score_layer == module.layer_idx:
        if run.method.scores == "keys":
            run.keys = key
        elif run.method.scores == "queries":
            run.queries, run.keys, run.scale = query, key, kwargs.get("scaling") or module.scaling
        elif run.method.scores == "raters":
            scale = kwargs.get("scaling") or module.scaling
            run.scores = []
            for span, raters in zip(run.spans, run.raters):
                row = rows_attention(query[span.row], key[span.row], raters, run.visible()[span.row], scale)
                run.scores.append(row[span.start : span.start + span.length])
        else:
            rows = _last_real(run.mask)
            scale = kwargs.get("scaling") or module.scaling
            run.attention = row_attention(query[torch.arange(query.shape[0]), :, rows], key, rows, run.visible(), scale)
    name = module._tokenreduce_kernel
    if name == "eager":
        kernel = sys.modules[original_class(module).__module__].eager_attention_forward
    else:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        kernel = ALL_ATTENTION_FUNCTIONS[name]
    return kernel(module, query, key, value, attention_mask, **kwargs)


def _last_real(mask: Tensor) -> Tensor:
    """Each row's last real position (the last prompt token), with padding on either side."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask.bool(), positions, -1).argmax(dim=1)


@dataclass
class DecodeSelection:
    """Kept on a generate call's cache (so reset with every call) when an in-LLM method selects cached
    visual entries on decode steps (:meth:`~tokenreduce.methods.llm.LLMMethod.decode_layer`): every
    layer keeps its whole cache; on a decode step, layer ``layer - 1`` scores (:meth:`score`), then the
    layers from ``layer`` on attend to the selected tokens of each span plus every other entry.

    ``spans`` are the method's spans in the cache (the prefill's sequence), ``mask [B, P]`` the
    prefill's 2-D mask; per span, ``previous`` holds the last step's attention and ``kept`` its
    selection; ``steps`` gathers, per decode step, each span's selection (the record's
    ``decode_steps``)."""

    method: LLMMethod
    layer: int
    spans: list[ImageSpan]
    mask: Tensor
    previous: list[Tensor | None]
    kept: list[Tensor | None]
    steps: list[tuple[Tensor, ...]]
    attention: Tensor | None = None  # [B, kv] this step's attention row of layer - 1
    index: Tensor | None = None  # [B, K] the entries the layers from `layer` read this step (None: all)
    visible: Tensor | None = None  # [B, K] False on the padding of `index` (rows that read fewer)
    substitutes: dict[int, Tensor | None] = field(default_factory=dict)

    def score(self, layer: nn.Module, hidden: Tensor, kwargs: dict, cache) -> None:
        """This step's attention of ``layer`` (the one before :attr:`layer`, which has just run on
        ``hidden``): its query for the current token against all its cached keys, the current one
        included (SDPA-safe: one row, recomputed)."""
        attention = layer.self_attn
        cos, sin = kwargs["position_embeddings"]
        q = _query(attention, layer.input_layernorm(hidden), cos, sin)[:, :, -1]
        keys = cache.layers[self.layer - 1].keys
        b, length = keys.shape[0], keys.shape[2]
        mask = torch.cat([self.mask, self.mask.new_ones(b, length - self.mask.shape[1])], dim=1)
        rows = torch.full((b,), length - 1, device=keys.device)
        self.attention = row_attention(q, keys, rows, mask, attention.scaling)

    def select(self) -> None:
        """This step's entries for the layers from :attr:`layer` on (``index``; ``None`` when every
        span keeps all its tokens)."""
        assert self.attention is not None
        shape, chosen = self.attention.shape, []
        for i, span in enumerate(self.spans):
            row = self.attention[span.row, span.start : span.start + span.length]
            self.kept[i] = self.method.decode_keep(row, self.previous[i], self.kept[i])
            self.previous[i] = row
            chosen.append(self.kept[i])
        self.steps.append(tuple(chosen))
        self.attention, self.substitutes = None, {}
        if all(kept.shape[0] == span.length for kept, span in zip(chosen, self.spans)):
            self.index = self.visible = None
            return
        read = torch.ones(shape, dtype=torch.bool, device=self.mask.device)
        for span, kept in zip(self.spans, chosen):
            read[span.row, span.start : span.start + span.length] = False
            read[span.row, span.start + kept] = True
        counts = read.sum(dim=1)
        width = int(counts.max())
        self.index = (~read).to(torch.int8).argsort(dim=1, stable=True)[:, :width]  # read entries first, in order
        self.visible = torch.arange(width, device=read.device) < counts[:, None]

    def arguments(self, kwargs: dict, hidden: Tensor) -> dict:
        """A decode step's arguments for a layer reading the selection: the mask's columns follow it."""
        mask = kwargs.get("attention_mask")
        if id(mask) not in self.substitutes:
            if mask is None:  # SDPA without padding: a mask only where rows read different counts
                visible = self.visible[:, None, None, :].expand(-1, 1, hidden.shape[1], -1)
                self.substitutes[id(mask)] = None if bool(self.visible.all()) else visible
            else:
                columns = self.index[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1)
                self.substitutes[id(mask)] = hide_columns(mask.gather(3, columns), self.visible)
        return {**kwargs, "attention_mask": self.substitutes[id(mask)]}


class SelectedEntries:
    """Mixed in front of a generate call's cache whose decode steps read a selection: every layer
    stores all its entries, and on decode steps the layers from the selection's layer on read the
    selected ones (the reference's ``PrunableDynamicCache.update``)."""

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)  # type: ignore[misc]
        selection: DecodeSelection = getattr(self, SELECTION)
        if layer_idx < selection.layer or selection.index is None or key_states.shape[2] != 1:
            return keys, values
        pick = selection.index[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
        return keys.gather(2, pick), values.gather(2, pick)


_SELECTING: dict[type, type] = {}  # cache class -> its SelectedEntries subclass


def open_selection(run: LLMRun, text: nn.Module, cache) -> DecodeSelection | None:
    """After a prefill of ``text`` run by ``run``: when its method selects cached entries on decode
    steps, the selection, kept on ``cache`` (whose class then returns the selected entries)."""
    layer = run.method.decode_layer(len(text.layers))
    if layer is None or cache is None:
        return None
    n = len(run.spans)
    selection = DecodeSelection(run.method, layer, list(run.spans), run.mask, [None] * n, [None] * n, [])
    cls = type(cache)
    if not issubclass(cls, SelectedEntries):
        if cls not in _SELECTING:
            _SELECTING[cls] = type(f"Selecting{cls.__name__}", (SelectedEntries, cls), {})
        cache.__class__ = _SELECTING[cls]
    setattr(cache, SELECTION, selection)
    return selection


def _query(attention: nn.Module, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``attention``'s queries for its normed input ``x [B, q, D]``, per-head norm and rotary
    (``cos``/``sin`` for those ``q`` positions) applied as the module applies them: ``[B, H, q, d]``."""
    rotate = sys.modules[original_class(attention).__module__].apply_rotary_pos_emb
    q = attention.q_proj(x).view(*x.shape[:2], -1, attention.head_dim)
    if hasattr(attention, "q_norm"):
        q = attention.q_norm(q)
    q = q.transpose(1, 2)
    return rotate(q, q, cos, sin)[0]


def register_kernel() -> None:
    """Make the scoring kernel known to transformers (at install, and when a saved patched model loads)."""
    from transformers import AttentionInterface

    AttentionInterface.register(KERNEL, _scoring_kernel)


@loadable
class PruningLayer:
    """Mixed in front of every decoder layer of a VLM's LLM (see the module docstring)."""

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        register_kernel()  # a patched model loaded in a fresh process names the kernel in its configs

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        if args:
            raise TypeError("tokenreduce calls decoder layers with keyword arguments only")

        def run_layer(hidden: Tensor, **kw):
            return super(PruningLayer, self).forward(hidden, **kw)

        return layer_forward(self, self._tokenreduce_index, hidden_states, kwargs, run_layer)


@loadable
class ReusedKeys:
    """Mixed in front of the key projection of a layer that scored with its own keys: when the layer
    then runs on the kept tokens, their keys are the ones already projected (no second projection)."""

    def forward(self, x: Tensor) -> Tensor:
        run = _run(self)
        if run is not None and run.projected_keys is not None:
            keys, run.projected_keys = run.projected_keys, None
            return keys
        return super().forward(x)  # type: ignore[misc]


def install(patch: Patch, text: nn.Module, method: LLMMethod) -> None:
    """Patch the decoder layers of ``text`` (a transformers text model) for ``method``."""
    register_kernel()
    layers = list(text.layers)
    prune = method.prune_layers(len(layers))
    check_restores(method.restore_layers(len(layers)), prune, len(layers))
    if method.masks_only and method.restore_layers(len(layers)):
        raise ValueError(f"{method.name} masks tokens: it cannot also restore them (restore_layers)")
    scoring = {p - 1 for p in prune} if method.scores_from == "previous" and method.scores != "none" else set()
    for i, layer in enumerate(layers):
        patch.set_attr(layer, ATTR, patch)
        patch.set_attr(layer, "_tokenreduce_index", i)
        patch.swap_class(layer, PruningLayer)
        if method.scores_from == "own" and i in prune:
            keys = layer.self_attn.k_proj
            patch.set_attr(keys, ATTR, patch)
            patch.swap_class(keys, ReusedKeys)
        if i in scoring:
            attention = layer.self_attn
            patch.set_attr(attention, ATTR, patch)
            patch.set_attr(attention, "_tokenreduce_kernel", attention.config._attn_implementation)
            config = copy.copy(attention.config)
            config._attn_implementation = KERNEL
            patch.replace_attr(attention, "config", config)


def open_run(method: LLMMethod, text: nn.Module, spans: list[ImageSpan], mask: Tensor, reindex: bool) -> LLMRun:
    """The pruning state of one prefill of ``text`` whose prompt has image (and video) ``spans`` and 2-D ``mask``."""
    layers = method.prune_layers(len(text.layers))
    origin = [torch.arange(sp.length, device=mask.device) for sp in spans]
    run = LLMRun(
        method, layers, reindex, text.rotary_emb, [sp.length for sp in spans], list(spans), origin, mask.long(), norm=text.norm
    )
    run.owner = [o.clone() for o in origin]
    run.restores = {b: a for a, b in method.restore_layers(len(text.layers)).items()}
    run.memory = [None] * len(spans)
    run.score_layer = run.next_score_layer()
    return run


def check_cache(cache) -> None:
    if cache is not None and any("Static" in type(layer).__name__ for layer in getattr(cache, "layers", [])):
        raise ValueError(
            "in-LLM pruning needs a dynamic cache (layers after a pruning layer hold fewer tokens); "
            f"got {type(cache).__name__}: use the default DynamicCache (no cache_implementation='static')"
        )


def layer_forward(layer: nn.Module, index: int, hidden: Tensor, kwargs: dict, run_layer):
    run = _run(layer)
    if run is not None:
        if index == 0 and run.method.scores == "raters":
            run.raters = run.method.text_raters(hidden, run.spans, run.mask)
        if index in run.restores:
            hidden = _restore(run, index, hidden)
        if index in run.layers:
            if run.method.scores_from == "own":
                _own_attention(run, layer, hidden, kwargs)
            hidden = _prune(run, index, hidden)
            if run.hidden and kwargs.get("cache") is not None:  # for the decode steps
                setattr(kwargs["cache"], HIDDEN, tuple(run.hidden))
        if run.stages:
            kwargs = _prefill_arguments(run, kwargs, hidden, layer)
        elif run.masked is not None:
            kwargs = _masked_arguments(run, kwargs, hidden)
        run.lengths.append(tuple(int(n) for n in run.mask.sum(1).tolist()))
        return run_layer(hidden, **kwargs)
    cache = kwargs.get("cache")
    selection: DecodeSelection | None = getattr(cache, SELECTION, None) if cache is not None else None
    if selection is not None and hidden.shape[1] == 1:
        if index == selection.layer:
            selection.select()
        if index >= selection.layer and selection.index is not None:
            kwargs = selection.arguments(kwargs, hidden)
        if index == selection.layer - 1:
            out = run_layer(hidden, **kwargs)
            selection.score(layer, hidden, kwargs, cache)
            return out
    masked = next((m for at, m in reversed(getattr(cache, HIDDEN, ()) if cache is not None else ()) if at <= index), None)
    if masked is not None:
        mask = kwargs.get("attention_mask")
        keys = mask.shape[-1] if mask is not None else cache.get_seq_length(index) + hidden.shape[1]
        kwargs = {**kwargs, "attention_mask": _hidden_mask(mask, masked, hidden.shape[1], keys)}
    pruned: Pruned | None = getattr(cache, STAGES, None) if cache is not None else None
    stage = None if pruned is None else next((s for s in reversed(pruned.stages) if s.layer <= index), None)
    if stage is not None:
        kwargs = _decode_arguments(stage.compaction, kwargs, hidden, layer, getattr(cache, STAGES).rotary)
    return run_layer(hidden, **kwargs)


def _own_attention(run: LLMRun, layer: nn.Module, hidden: Tensor, kwargs: dict) -> None:
    """Score with ``layer``'s own attention before it runs: its input norm, keys for every token and
    the query of each row's last prompt token only (per-head norms and rotary as the layer applies
    them), without touching the cache. Methods scoring by ``"visual"`` get instead, per image, the
    attention its tokens receive from its own tokens' queries (causal softmax over the whole row,
    mean over heads and those queries) and the layer's rotated keys."""
    if run.stages:
        kwargs = _prefill_arguments(run, kwargs, hidden, layer)
    attention = layer.self_attn
    rotate = sys.modules[original_class(attention).__module__].apply_rotary_pos_emb
    b, length = hidden.shape[:2]
    rows = _last_real(run.mask)
    x = layer.input_layernorm(hidden)
    raw = attention.k_proj(x)
    run.projected_keys = raw  # cut to the kept tokens by _prune, reused by the layer (ReusedKeys)
    k = raw.view(b, length, -1, attention.head_dim)
    visual = run.method.scores == "visual"  # every image token's query: projecting all is cheaper than picking
    cos, sin = kwargs["position_embeddings"]
    cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
    if visual:
        x_q, cos_q, sin_q = x, cos, sin
    else:
        pick = rows[:, None, None].expand(-1, 1, cos.shape[-1])
        x_q, cos_q, sin_q = x[torch.arange(b), rows][:, None], cos.gather(1, pick), sin.gather(1, pick)
    if hasattr(attention, "k_norm"):
        k = attention.k_norm(k)
    _, k = rotate(k.transpose(1, 2), k.transpose(1, 2), cos, sin)
    q = _query(attention, x_q, cos_q, sin_q)
    if not visual:
        run.attention = row_attention(q[:, :, 0], k, rows, run.visible(), attention.scaling)
        return
    run.keys, run.scores = k, []
    for span in run.spans:
        image = torch.arange(span.start, span.start + span.length, device=k.device)
        row = rows_attention(q[span.row], k[span.row], image, run.visible()[span.row], attention.scaling)
        run.scores.append(row[image])


def _prune(run: LLMRun, index: int, hidden: Tensor) -> Tensor:
    """Reduce visual tokens before layer ``index``: the method selects per image (kept tokens, possibly
    merged ones after them), every row keeps its text, re-padded to the longest row."""
    stage = run.pruned
    if run.method.scores != "none" and run.attention is None and run.keys is None and run.scores is None:
        raise RuntimeError(f"the scoring layer of pruning layer {index} did not run")
    keep = [min(span.length, run.method.kept(n, stage)) for span, n in zip(run.spans, run.inputs)]
    visual = torch.zeros_like(run.mask, dtype=torch.bool)
    for span in run.spans:
        visual[span.row, span.start : span.start + span.length] = True
    ctx = LLMContext(index, stage, hidden, run.spans, keep, run.attention, run.mask)
    ctx.keys, ctx.scores, ctx.norm, ctx.visual = run.keys, run.scores, run.norm, visual
    ctx.queries, ctx.scale = run.queries, run.scale
    ctx.memory = run.memory  # the method writes each span's entry: it lives as long as the run
    ctx.masked = run.masked
    selections = run.method.select(ctx)
    if run.method.masks_only:
        _hide(run, index, selections)
        return hidden
    entering, hidden = hidden, hidden.clone()
    keeps = []
    for span, selection in zip(run.spans, selections):
        tokens = hidden[span.row, span.start : span.start + span.length]
        hidden[span.row, span.start : span.start + selection.num_out] = selection.apply(tokens[None])[0]
        keeps.append(SpanKeep(span.row, span.start, span.length, selection.num_out, selection.index[0]))
    step = compact(run.mask, keeps, run.reindex)
    if index in run.restores.values():
        state = (run.spans, run.origin, run.owner, run.mask, run.raters, tuple(run.stages))
        run.saved[index] = Saved(entering, *state, selections, step)
    if run.projected_keys is not None:  # the layer's own keys, for the tokens it will read
        if all(sel.gather_only for sel in selections):
            run.projected_keys = run.projected_keys.gather(
                1, step.position_index[..., None].expand(-1, -1, run.projected_keys.shape[-1])
            )
        else:
            run.projected_keys = None
    run.spans = [  # a span that kept nothing has no place left: it starts nowhere (0) and is empty; no grid once cut
        dataclasses.replace(
            sp,
            start=int((step.embed_index[sp.row] == sp.start).nonzero()[0]) if sel.num_out else 0,
            length=sel.num_out,
            grid=None,
        )
        for sp, sel in zip(run.spans, selections)
    ]
    run.origin = [o[sel.index[0]] for o, sel in zip(run.origin, selections)]
    run.owner = [torch.where(o >= 0, sel.slot[0][o.clamp(min=0)], -1) for o, sel in zip(run.owner, selections)]
    if run.raters is not None:
        run.raters = [_moved(r, step, span.row) for r, span in zip(run.raters, run.spans)]
    run.steps.append(LLMStep(index, tuple(run.origin)))
    total = run.stages[-1].compaction.then(step) if run.stages else step
    run.stages.append(PruneStage(index, total))
    run.mask, run.attention, run.keys, run.queries, run.scores, run.substitutes = step.mask, None, None, None, None, {}
    run.pruned += 1
    run.score_layer = run.next_score_layer()
    return step.embeds(hidden)


def _hide(run: LLMRun, index: int, selections: list[Selection]) -> None:
    """A masks-only pruning layer: the tokens of each span its selection does not keep become hidden
    columns from layer ``index`` on; the sequence stays as it is."""
    masked = torch.zeros_like(run.mask, dtype=torch.bool) if run.masked is None else run.masked.clone()
    for span, selection in zip(run.spans, selections):
        kept = selection.index[0]
        if not selection.gather_only or bool(masked[span.row, span.start + kept].any()):
            raise RuntimeError(f"{run.method.name} masks tokens: at layer {index} it must keep visible ones and merge none")
        masked[span.row, span.start : span.start + span.length] |= selection.slot[0] < 0
    if bool(masked.any()):  # else nothing changes: the layers keep the model's own masks
        run.masked = masked
        run.hidden.append((index, masked))
    run.origin = [selection.index[0] for selection in selections]  # the spans are whole: span index = input index
    run.owner = [selection.slot[0] for selection in selections]
    run.steps.append(LLMStep(index, tuple(run.origin)))
    run.attention, run.keys, run.queries, run.scores, run.substitutes = None, None, None, None, {}
    run.pruned += 1
    run.score_layer = run.next_score_layer()


def _masked_arguments(run: LLMRun, kwargs: dict, hidden: Tensor) -> dict:
    """A prefill layer's arguments after a masks-only stage: its mask hides the hidden columns
    (computed once per stage and mask)."""
    mask = kwargs.get("attention_mask")
    key = ("attention_mask", id(mask))
    if key not in run.substitutes:
        run.substitutes[key] = _hidden_mask(mask, run.masked, hidden.shape[1], hidden.shape[1])
    return {**kwargs, "attention_mask": run.substitutes[key]}


def _hidden_mask(mask: Tensor | None, masked: Tensor, queries: int, keys: int) -> Tensor:
    """The 4-D ``mask`` of a layer (``None``: SDPA's causal path, for which it is built) for ``queries``
    tokens reading ``keys`` entries, with the hidden columns ``masked [B, P]`` (of the first ``P``) hidden."""
    if mask is None:
        causal = torch.ones(queries, keys, dtype=torch.bool, device=masked.device).tril(keys - queries)
        mask = causal.expand(masked.shape[0], 1, -1, -1)
    return hide_columns_keeping_rows(mask, masked)


def _restore(run: LLMRun, index: int, hidden: Tensor) -> Tensor:
    """Before layer ``index``, give back the sequence the pruning layer it restores received: every
    token of the short sequence goes back to its place there (image spans are then overwritten; a
    padding slot only to padding, so that a prompt that lost nothing comes back as it ran), each
    image's tokens are rebuilt by the method from their saved input and its outputs now."""
    saved = run.saved.pop(run.restores[index])
    step = saved.step
    full = saved.hidden.clone()
    for row in range(full.shape[0]):
        back = step.mask[row].bool() | ~saved.mask[row].bool()[step.embed_index[row]]
        full[row, step.embed_index[row, back]] = hidden[row, back]
    for before, now, selection in zip(saved.spans, run.spans, saved.selections):
        tokens = saved.hidden[before.row, before.start : before.start + before.length][None]
        after = hidden[now.row, now.start : now.start + now.length][None]
        full[before.row, before.start : before.start + before.length] = run.method.restore(tokens, selection, after)[0]
    run.spans, run.origin, run.owner, run.mask, run.raters = saved.spans, saved.origin, saved.owner, saved.mask, saved.raters
    earlier = saved.stages[-1].compaction if saved.stages else compact(saved.mask, [], run.reindex)
    run.stages.append(PruneStage(index, earlier))
    run.steps.append(LLMStep(index, tuple(run.origin)))
    run.attention, run.keys, run.queries, run.scores, run.substitutes = None, None, None, None, {}
    return full


def _moved(positions: Tensor, step: Compaction, row: int) -> Tensor:
    """Where the (text) tokens at ``positions`` of ``row`` went in the compacted sequence."""
    new = torch.full((step.length,), -1, dtype=torch.long, device=positions.device)
    real = step.mask[row].bool()
    new[step.position_index[row][real]] = torch.arange(step.mask.shape[1], device=positions.device)[real]
    return new[positions]


def deepstack_inputs(run: LLMRun, visual: Tensor, embeds: Tensor) -> tuple[Tensor, Tensor]:
    """Qwen3-VL's visual mask ``[B, L]`` and deepstack features ``[visual tokens, D]`` of the LLM's
    input, cut to the current sequence's kept visual tokens."""
    compaction = run.stages[-1].compaction
    full = embeds.new_zeros(*visual.shape, embeds.shape[-1])
    full[visual] = embeds
    kept = visual.gather(1, compaction.position_index) & compaction.mask.bool()
    index = compaction.position_index[..., None].expand(-1, -1, embeds.shape[-1])
    return kept, full.gather(1, index)[kept]


def _prefill_arguments(run: LLMRun, kwargs: dict, hidden: Tensor, layer: nn.Module) -> dict:
    """A layer's arguments cut to the current sequence; computed once per stage and shared object."""
    compaction = run.stages[-1].compaction
    out = dict(kwargs)
    for name in ("attention_mask", "position_ids", "position_embeddings"):
        value = kwargs.get(name)
        key = (name, id(value))
        if key not in run.substitutes:
            run.substitutes[key] = _cut(name, value, compaction, kwargs, hidden, layer, run.rotary)
        out[name] = run.substitutes[key]
    return out


def _cut(name: str, value, compaction: Compaction, kwargs: dict, hidden: Tensor, layer: nn.Module, rotary: nn.Module):
    b = compaction.mask.shape[0]
    if name == "attention_mask":
        if value is None:  # SDPA's causal path: a mask only where rows were re-padded
            return None if bool(compaction.mask.all()) else compaction.causal_mask()
        return compaction.square_mask(value)
    if name == "position_ids":
        return None if value is None else compaction.positions(_rows(value, b))
    if value is None:
        return None
    if compaction.reindex:
        positions = compaction.positions(_rows(kwargs["position_ids"], b))
        return _rotary(rotary, hidden, positions, layer)
    index = compaction.position_index
    return tuple(t.expand(b, -1, -1).gather(1, index[..., None].expand(-1, -1, t.shape[-1])) for t in value)


def _decode_arguments(compaction: Compaction, kwargs: dict, hidden: Tensor, layer: nn.Module, rotary: nn.Module) -> dict:
    """A decode step's arguments for a layer whose cache holds a pruned prefill."""
    out = dict(kwargs)
    mask = kwargs.get("attention_mask")
    if mask is not None:
        out["attention_mask"] = compaction.decode_columns(mask)
    elif not bool(compaction.mask.all()):
        out["attention_mask"] = compaction.causal_mask(hidden.shape[1])
    if compaction.reindex and kwargs.get("position_ids") is not None:
        positions = compaction.decode_positions(_rows(kwargs["position_ids"], hidden.shape[0]))
        out["position_ids"] = positions
        out["position_embeddings"] = _rotary(rotary, hidden, positions, layer)
    return out


def _rows(position_ids: Tensor, batch: int) -> Tensor:
    return position_ids.expand(*position_ids.shape[:-2], batch, position_ids.shape[-1])


def _rotary(rotary: nn.Module, hidden: Tensor, positions: Tensor, layer: nn.Module):
    """The rotary tables for ``positions`` (Gemma3's rotary module also takes the layer's type)."""
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        return rotary(hidden, positions, layer.self_attn.config.layer_types[layer._tokenreduce_index])
    return rotary(hidden, positions)
