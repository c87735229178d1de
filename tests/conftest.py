"""Tiny random encoders covering every token layout the encoder adapters support: timm ViTs and the
Hugging Face vision towers. Every one sees 64 patches of a 32 px image, plus its prefix tokens."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import ResPostBlock, VisionTransformer  # noqa: E402

# Tiny models: two threads on a shared 2-core machine are many times noisier than one.
torch.set_num_threads(1)

BASE = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)

# name -> (class, overrides). 64 patch tokens plus the prefix tokens in every case.
TIMM_MODELS = {
    "vit": (VisionTransformer, {}),
    "deit_distilled": (VisionTransformerDistilled, {}),
    "dinov2_reg": (VisionTransformer, dict(init_values=0.5, reg_tokens=4, no_embed_class=True)),
    "qknorm_avg": (VisionTransformer, dict(qk_norm=True, global_pool="avg")),
    "respost": (VisionTransformer, dict(block_fn=ResPostBlock, init_values=0.7)),
    "no_cls_avg": (VisionTransformer, dict(class_token=False, global_pool="avg")),
}

HF_BASE = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=3, image_size=32, patch_size=4)
# name -> (model class, config class) in transformers, by name so that collection does not import it
HF_MODELS = {
    "hf_clip": ("CLIPVisionModel", "CLIPVisionConfig"),
    "hf_siglip": ("SiglipVisionModel", "SiglipVisionConfig"),
    "hf_dinov2": ("Dinov2Model", "Dinov2Config"),
    "hf_vit": ("ViTModel", "ViTConfig"),
}
MODELS = [*TIMM_MODELS, *HF_MODELS]


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights large enough that tokens differ and attention is peaked, so a wrong merge shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=gen) * 1.5 / math.sqrt(fan_in))
            elif name.endswith("weight") or name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def build(name: str, seed: int = 0, **overrides) -> nn.Module:
    if name in HF_MODELS:
        import transformers

        model_cls, config_cls = (getattr(transformers, n) for n in HF_MODELS[name])
        model = model_cls(config_cls(**{**HF_BASE, **overrides}))
    else:
        cls, kw = TIMM_MODELS[name]
        model = cls(**{**BASE, **kw, **overrides})
    return randomize(model, seed).eval()


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's main output tensor: timm logits, or a Hugging Face tower's last hidden state."""
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def pooled(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One vector per image (timm logits, a tower's pooler output): robust to which tokens survived."""
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def use_eager_attention(model: nn.Module) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:
        for block in model.blocks:
            block.attn.fused_attn = False


def layout(model: nn.Module) -> tuple[int, int]:
    """``(depth, prefix tokens)`` as the model's adapter sees them."""
    from tokenreduce.adapters import locate

    _, target, adapter = locate(model)
    return len(adapter.blocks(target)), adapter.num_prefix_tokens(target)


def images(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=sorted(MODELS))
def model_name(request) -> str:
    return request.param


IMAGE_TOKEN = 999


def tiny_llava(seed: int = 0, tower: str = "clip", **overrides) -> nn.Module:
    """A LLaVA-1.5-shaped model: a 2-layer CLIP (or SigLIP) tower on 32 px images with 8 px patches (16
    visual tokens on a 4x4 grid), the penultimate layer read, and a 4-layer Llama."""
    import transformers

    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    vision_config = (
        transformers.CLIPVisionConfig(**vision, projection_dim=32)
        if tower == "clip"
        else transformers.SiglipVisionConfig(**vision)
    )
    text = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=2048,
    )
    config = transformers.LlavaConfig(
        vision_config=vision_config,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default" if tower == "clip" else "full",
        image_seq_length=16,
        **overrides,
    )
    return randomize(transformers.LlavaForConditionalGeneration(config), seed).eval()


def prompt(text_before: list[int], images: int = 1, text_after: tuple[int, ...] = (7, 8), tokens: int = 16) -> list[int]:
    """Token ids: text, ``images`` runs of ``tokens`` image placeholders separated by a text token, text."""
    ids = list(text_before)
    for i in range(images):
        ids += [IMAGE_TOKEN] * tokens + ([11 + i] if i < images - 1 else [])
    return ids + list(text_after)


def batch(prompts: list[list[int]], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` padded with token 0 on ``side``."""
    length = max(map(len, prompts))
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, p in enumerate(prompts):
        part = slice(length - len(p), length) if side == "left" else slice(0, len(p))
        ids[i, part], mask[i, part] = torch.tensor(p), 1
    return ids, mask


def pixels(count: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
