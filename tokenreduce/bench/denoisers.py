"""Diffusion models for the bench: named random-weight denoisers (and one pipeline) built from configs,
a user's diffusers folder, and seeded inputs built from any supported model's own config.

The configs are the diffusion spec's tiny CPU configs (section 5.1), with the latent sizes raised so
that attention runs over 1024 to 4096 tokens; ``sd-unet`` is SD 1.x's layout shrunk to widths 32 and 64
with its attention at the full latent resolution, where tomesd acts. Nothing here downloads weights.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenreduce.adapters import locate
from tokenreduce.adapters.base import class_names

# Text tokens of the conditioning built for a model without its text encoder.
TEXT_TOKENS = 8
PROMPT = "a photo of a cat sitting on a wooden table"


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise ValueError("the diffusion bench needs diffusers: pip install diffusers") from None
    return diffusers


def sd_unet(latent: int) -> nn.Module:
    """SD 1.x's UNet layout at widths (32, 64): cross-attention blocks at the full latent resolution
    (tomesd's ``max_downsample=1`` level: 3 transformer blocks over ``latent**2`` tokens, one at 2x
    down), 8 heads, 32-wide text."""
    d = _diffusers()
    return d.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=latent,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
        attention_head_dim=8,
    )


def dit(latent: int) -> nn.Module:
    """DiT (``ada_norm_zero``, class-conditional): 2 blocks of width 16, patch 2."""
    return _diffusers().DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=latent,
        patch_size=2,
        norm_type="ada_norm_zero",
        num_embeds_ada_norm=1000,
    )


def pixart(latent: int) -> nn.Module:
    """PixArt-alpha (``ada_norm_single``, cross-attention to the caption): 2 blocks of width 24, patch 2."""
    return _diffusers().PixArtTransformer2DModel(
        sample_size=latent,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )


def sd3(latent: int, **overrides: Any) -> nn.Module:
    """SD3 MMDiT (joint text-image attention): 2 blocks of width 32, patch 1; ``overrides`` are further
    ``SD3Transformer2DModel`` keywords (SD3.5's ``dual_attention_layers``, ``qk_norm``)."""
    return _diffusers().SD3Transformer2DModel(
        sample_size=latent,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        **overrides,
    )


def flux(latent: int) -> nn.Module:
    """FLUX (packed tokens, rotary positions): 1 double and 1 single block of width 32."""
    return _diffusers().FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )


def sd_pipeline(latent: int) -> Any:
    """``sd-unet`` in a StableDiffusionPipeline with a 2-level VAE (latents 2x smaller than the image),
    a DDIM scheduler and no text encoder (the bench passes prompt embeddings)."""
    d = _diffusers()
    vae = d.AutoencoderKL(
        block_out_channels=[32, 32],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=2 * latent,
    )
    return d.StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=None,
        tokenizer=None,
        unet=sd_unet(latent).eval(),
        scheduler=d.DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@dataclass(frozen=True)
class NamedModel:
    build: Callable[[int], Any]  # latent size -> model (random weights)
    latent: int  # default latent size
    batch: int  # default batch: a CFG pair for a denoiser call, images for a pipeline


# Latent sizes: 4096 tokens for the UNet (the target), 1024 for the DiTs after patching.
MODELS: dict[str, NamedModel] = {
    "sd-unet": NamedModel(sd_unet, 64, 2),
    "dit": NamedModel(dit, 64, 2),
    "pixart": NamedModel(pixart, 64, 2),
    "sd3": NamedModel(sd3, 32, 2),
    "flux": NamedModel(flux, 32, 1),  # guidance-distilled: no CFG pair
    "sd-pipeline": NamedModel(sd_pipeline, 64, 1),
}
DEFAULT_MODEL = "sd-unet"


def build_named(name: str, latent: int | None = None, seed: int = 0) -> Any:
    """The named model with random weights drawn from ``seed``, in eval mode."""
    if name not in MODELS:
        raise ValueError(
            f"--model must be one of {', '.join(MODELS)} for the diffusion bench (or pass --checkpoint), got {name!r}"
        )
    torch.manual_seed(seed)
    model = MODELS[name].build(MODELS[name].latent if latent is None else latent)
    return model.eval() if isinstance(model, nn.Module) else model


def load_checkpoint(path: str | Path) -> Any:
    """A diffusers folder written by ``save_pretrained``: a pipeline (``model_index.json``) or one
    denoiser model (``config.json`` naming its class). Read from disk only."""
    d = _diffusers()
    path = Path(path)
    index = path / "model_index.json"
    if index.is_file():
        # components saved as None (no text encoder, say) must be passed as None again
        absent = {k: None for k, v in json.loads(index.read_text()).items() if v == [None, None]}
        pipe = d.DiffusionPipeline.from_pretrained(path, local_files_only=True, **absent)
        for component in pipe.components.values():
            if isinstance(component, nn.Module):
                component.eval()
        return pipe
    config = path / "config.json"
    if config.is_file():
        name = json.loads(config.read_text()).get("_class_name")
        cls = getattr(d, name, None) if isinstance(name, str) else None
        if cls is None:
            raise ValueError(f"--checkpoint {str(path)!r}: config.json names no diffusers model class (_class_name {name!r})")
        return cls.from_pretrained(path, local_files_only=True).eval()
    raise ValueError(
        f"--checkpoint {str(path)!r} must be a diffusers folder written by save_pretrained: a pipeline "
        "(model_index.json) or a denoiser (config.json)"
    )


def is_pipeline(model: Any) -> bool:
    return not isinstance(model, nn.Module) and isinstance(getattr(model, "components", None), dict)


def denoiser_of(model: Any) -> nn.Module:
    """The denoiser tokenreduce patches: the model itself, or a pipeline's unet or transformer."""
    return locate(model)[1]


def denoiser_kind(denoiser: nn.Module) -> str:
    """The diffusers class a denoiser is (or derives from), among those the bench builds inputs for."""
    names = list(class_names(denoiser))
    for kind in ("UNet2DConditionModel", "DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel",
                 "FluxTransformer2DModel"):  # fmt: skip
        if any(n.endswith("." + kind) for n in names):
            return kind
    raise TypeError(f"the diffusion bench builds inputs for {type(denoiser).__name__}: not a denoiser it knows")


def text_width(denoiser: nn.Module) -> int:
    """Width of the text embeddings the denoiser reads (its cross-attention or joint-attention input)."""
    c = denoiser.config
    for key in ("caption_channels", "joint_attention_dim", "cross_attention_dim"):
        width = c.get(key)
        if width is not None:
            return width if isinstance(width, int) else width[0]
    raise TypeError(f"{type(denoiser).__name__} reads no text")


def pooled_width(denoiser: nn.Module) -> int | None:
    """Width of the pooled text embedding (SD3, FLUX; SDXL's ``text_embeds``), ``None`` when there is none."""
    c = denoiser.config
    if c.get("pooled_projection_dim") is not None:
        return c.pooled_projection_dim
    if c.get("addition_embed_type") == "text_time":
        return c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return None


@dataclass
class DenoiserCall:
    """One seeded denoiser call: the latent positional (as tomesd's size hook reads ``args[0]``), the rest
    by keyword; ``grid`` the latent's token grid (rows, cols) for packed FLUX outputs."""

    latent: torch.Tensor
    kwargs: dict[str, Any]
    grid: tuple[int, int]

    def __call__(self, model: nn.Module) -> torch.Tensor:
        out = model(self.latent, **self.kwargs, return_dict=False)
        return out[0]

    def to(self, device: torch.device, dtype: torch.dtype) -> DenoiserCall:
        def move(v):
            if isinstance(v, dict):
                return {k: move(x) for k, x in v.items()}
            if isinstance(v, torch.Tensor):
                return v.to(device, dtype) if v.is_floating_point() else v.to(device)
            return v

        return DenoiserCall(move(self.latent), move(self.kwargs), self.grid)


def denoiser_inputs(denoiser: nn.Module, batch: int, latent: int, seed: int = 0) -> DenoiserCall:
    """Seeded inputs for one call at a ``latent x latent`` latent, from the denoiser's config. An even
    batch is laid out as a CFG pipeline sends it: the same latents in both halves, the conditional text
    in the first, the unconditional in the second."""
    g = torch.Generator().manual_seed(seed)
    c = denoiser.config
    kind = denoiser_kind(denoiser)
    pairs = batch // 2 if batch % 2 == 0 else batch
    channels = c.in_channels
    shape = (pairs, latent * latent, channels) if kind == "FluxTransformer2DModel" else (pairs, channels, latent, latent)
    sample = torch.randn(shape, generator=g)
    sample = torch.cat([sample, sample]) if pairs != batch else sample
    t = 0.5 if kind == "FluxTransformer2DModel" else 500.0
    timestep = torch.tensor(t) if kind == "UNet2DConditionModel" else torch.full((batch,), t)
    kwargs: dict[str, Any] = {"timestep": timestep}
    if kind == "DiTTransformer2DModel":
        kwargs["class_labels"] = torch.arange(batch) % c.num_embeds_ada_norm
    else:
        kwargs["encoder_hidden_states"] = torch.randn(batch, TEXT_TOKENS, text_width(denoiser), generator=g)
    pooled = pooled_width(denoiser)
    if kind == "UNet2DConditionModel" and pooled is not None:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.randn(batch, 6, generator=g),
        }
    elif pooled is not None:
        kwargs["pooled_projections"] = torch.randn(batch, pooled, generator=g)
    if kind == "PixArtTransformer2DModel":
        extra = getattr(denoiser, "use_additional_conditions", False)
        size = torch.full((batch, 2), float(latent * 8)) if extra else None
        kwargs["added_cond_kwargs"] = {"resolution": size, "aspect_ratio": torch.ones(batch, 1) if extra else None}
    if kind == "FluxTransformer2DModel":
        ids = torch.zeros(latent, latent, 3)
        ids[..., 1] = torch.arange(latent)[:, None]
        ids[..., 2] = torch.arange(latent)[None, :]
        kwargs.update(img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(TEXT_TOKENS, 3))
        if c.get("guidance_embeds"):
            kwargs["guidance"] = torch.full((batch,), 3.5)
    grid = (latent // c.get("patch_size", 1) if kind != "UNet2DConditionModel" else latent,) * 2
    return DenoiserCall(sample, kwargs, grid)


@dataclass
class PipelineCall:
    """One seeded generation: the pipeline's keyword arguments and the seed of its noise (a fresh
    generator per call, so every variant starts from the same latents)."""

    kwargs: dict[str, Any]
    seed: int
    images: int

    def __call__(self, pipe: Any) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        return pipe(**self.kwargs, generator=generator, return_dict=False)[0]


def pipeline_inputs(pipe: Any, images: int, latent: int, steps: int, seed: int = 0) -> PipelineCall:
    """Seeded arguments for one generation of ``images`` images at a ``latent x latent`` latent in
    ``steps`` steps: the pipeline's own prompt through its text encoder when it has one, else random
    prompt embeddings of its denoiser's widths (and a negative pair for classifier-free guidance);
    decoded images (``output_type="pt"``) when it has a VAE, else latents."""
    params = inspect.signature(pipe.__call__).parameters
    denoiser = denoiser_of(pipe)
    g = torch.Generator().manual_seed(seed + 1)
    kwargs: dict[str, Any] = {
        "num_inference_steps": steps,
        "output_type": "pt" if getattr(pipe, "vae", None) is not None else "latent",
    }
    if "class_labels" in params:
        kwargs["class_labels"] = [i % denoiser.config.num_embeds_ada_norm for i in range(images)]
    elif getattr(pipe, "text_encoder", None) is not None and getattr(pipe, "tokenizer", None) is not None:
        kwargs["prompt"] = [PROMPT] * images
    else:
        width, pooled = text_width(denoiser), pooled_width(denoiser)
        names = ["prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask"]
        if "true_cfg_scale" not in params:  # FLUX is guidance-distilled: a negative prompt turns on a second pass
            names += ["negative_prompt_embeds", "negative_pooled_prompt_embeds", "negative_prompt_attention_mask"]
        for name in names:
            if name not in params:
                continue
            if name.endswith("pooled_prompt_embeds"):
                if pooled is not None:
                    kwargs[name] = torch.randn(images, pooled, generator=g)
            elif name.endswith("mask"):
                kwargs[name] = torch.ones(images, TEXT_TOKENS, dtype=torch.long)
            else:
                kwargs[name] = torch.randn(images, TEXT_TOKENS, width, generator=g)
        if "negative_prompt" in params and "negative_prompt_embeds" in kwargs:
            kwargs["negative_prompt"] = None  # PixArt's default "" clashes with given embeddings
        if "max_sequence_length" in params:
            kwargs["max_sequence_length"] = TEXT_TOKENS
    if "height" in params:
        scale = getattr(pipe, "vae_scale_factor", 8)
        kwargs["height"] = kwargs["width"] = latent * scale
    if "use_resolution_binning" in params:
        kwargs["use_resolution_binning"] = False
    return PipelineCall(kwargs, seed, images)
