"""Tiny diffusers denoisers with random weights (the configs of the diffusion spec, section 5.1) and the
inputs each one takes, so that every diffusion test builds its models one way."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from tokenreduce.bench import denoisers as configs  # noqa: E402  (the bench's named configs: the spec's tiny ones)


@dataclass
class Denoiser:
    """A tiny model and a builder of its keyword inputs for a batch (seeded, so calls repeat)."""

    name: str
    model: torch.nn.Module
    inputs: Callable[..., dict]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unet(full_res: bool = True, size: int = 32) -> Denoiser:
    """SD1-like UNet; ``full_res`` puts its attention at the latent's resolution (1024 tokens at 32x32)."""
    torch.manual_seed(0)
    down = ("CrossAttnDownBlock2D", "DownBlock2D") if full_res else ("DownBlock2D", "CrossAttnDownBlock2D")
    up = ("UpBlock2D", "CrossAttnUpBlock2D") if full_res else ("CrossAttnUpBlock2D", "UpBlock2D")
    model = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1 if full_res else 2,
        sample_size=size,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=32,
        norm_num_groups=32,
        attention_head_dim=8,
    ).eval()

    def inputs(batch: int = 2, seed: int = 0, h: int = size, w: int = size, t: float = 500.0) -> dict:
        g = _gen(seed)
        return {
            "sample": torch.randn(batch, 4, h, w, generator=g),
            "timestep": torch.tensor(t),
            "encoder_hidden_states": torch.randn(batch, 7, 32, generator=g),
        }

    return Denoiser("unet", model, inputs)


def unet_sdxl() -> Denoiser:
    """SDXL-like UNet: attention only at the 2x-downsampled level, text_time conditioning."""
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=32,
    ).eval()

    def inputs(batch: int = 2, seed: int = 0, h: int = 32, w: int = 32, t: float = 500.0) -> dict:
        g = _gen(seed)
        return {
            "sample": torch.randn(batch, 4, h, w, generator=g),
            "timestep": torch.tensor(t),
            "encoder_hidden_states": torch.randn(batch, 7, 64, generator=g),
            "added_cond_kwargs": {
                "text_embeds": torch.randn(batch, 32, generator=g),
                "time_ids": torch.randn(batch, 6, generator=g),
            },
        }

    return Denoiser("unet_sdxl", model, inputs)


def dit(size: int = 16) -> Denoiser:
    torch.manual_seed(0)
    model = configs.dit(size).eval()

    def inputs(batch: int = 2, seed: int = 0, h: int = size, w: int = size, t: float = 500.0) -> dict:
        g = _gen(seed)
        return {
            "hidden_states": torch.randn(batch, 4, h, w, generator=g),
            "timestep": torch.full((batch,), t),
            "class_labels": torch.arange(batch) % 10,
        }

    return Denoiser("dit", model, inputs)


def pixart(size: int = 16) -> Denoiser:
    torch.manual_seed(0)
    model = configs.pixart(size).eval()

    def inputs(batch: int = 2, seed: int = 0, h: int = size, w: int = size, t: float = 500.0) -> dict:
        g = _gen(seed)
        return {
            "hidden_states": torch.randn(batch, 4, h, w, generator=g),
            "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
            "timestep": torch.full((batch,), t),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }

    return Denoiser("pixart", model, inputs)


def sd3(dual: bool = False) -> Denoiser:
    torch.manual_seed(0)
    # SD3.5's block: dual attention in the first block, RMS qk-norm
    extra = {"dual_attention_layers": (0,), "qk_norm": "rms_norm"} if dual else {}
    model = configs.sd3(32, **extra).eval()

    def inputs(batch: int = 2, seed: int = 0, h: int = 32, w: int = 32, t: float = 500.0) -> dict:
        g = _gen(seed)
        return {
            "hidden_states": torch.randn(batch, 4, h, w, generator=g),
            "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
            "pooled_projections": torch.randn(batch, 64, generator=g),
            "timestep": torch.full((batch,), t),
        }

    return Denoiser("sd3_dual" if dual else "sd3", model, inputs)


def flux() -> Denoiser:
    torch.manual_seed(0)
    model = configs.flux(16).eval()

    def inputs(batch: int = 1, seed: int = 0, h: int = 16, w: int = 16, t: float = 0.5) -> dict:
        g = _gen(seed)
        ids = torch.zeros(h, w, 3)
        ids[..., 1] = torch.arange(h)[:, None]
        ids[..., 2] = torch.arange(w)[None, :]
        return {
            "hidden_states": torch.randn(batch, h * w, 4, generator=g),
            "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
            "pooled_projections": torch.randn(batch, 32, generator=g),
            "timestep": torch.full((batch,), t),
            "img_ids": ids.reshape(h * w, 3),
            "txt_ids": torch.zeros(8, 3),
        }

    return Denoiser("flux", model, inputs)


BUILDERS: dict[str, Callable[[], Denoiser]] = {
    "unet": unet,
    "unet_sdxl": unet_sdxl,
    "dit": dit,
    "pixart": pixart,
    "sd3": sd3,
    "sd3_dual": lambda: sd3(dual=True),
    "flux": flux,
}


def output(model: torch.nn.Module, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**kwargs, return_dict=False)
    return out[0]


def vae(flow: bool = False) -> torch.nn.Module:
    """The tiny VAE of the spec (section 5.2); ``flow`` adds SD3/FLUX's shift and scale."""
    torch.manual_seed(0)
    extra = {"shift_factor": 0.0609, "scaling_factor": 1.5035} if flow else {}
    return diffusers.AutoencoderKL(
        block_out_channels=[32, 32],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
        **extra,
    ).eval()


def sd_pipeline(model: torch.nn.Module | None = None):
    """A StableDiffusionPipeline on the tiny full-resolution UNet (or ``model``) and VAE, no text encoder
    (call it with ``prompt_embeds`` and ``negative_prompt_embeds`` of shape ``(1, 7, 32)``)."""
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet().model if model is None else model,
        vae=vae(),
        scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False),
        text_encoder=None,
        tokenizer=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
