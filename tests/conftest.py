"""Tiny random encoders covering every token layout the encoder adapters support: timm ViTs and the
Hugging Face vision towers. Every one sees 64 patches of a 32 px image, plus its prefix tokens."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

import tokenreduce

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


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: dynamo's per-code-object recompile limit (8) counts across tests,
    and every new model instance is a recompile of the same forward."""
    yield
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


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


# Tiny offline configs of every supported VLM family (the spec's values, transformers 5.24).
_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
    max_position_embeddings=2048,
)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
_QWEN_IDS = dict(image_token_id=IMAGE_TOKEN, video_token_id=998, vision_start_token_id=996, vision_end_token_id=997)
VLM_FAMILIES = [
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "idefics3",
    "smolvlm",
    "internvl",
    "gemma3",
]


def tiny_vlm(family: str, seed: int = 0) -> nn.Module:
    import transformers as T

    if family == "llava":
        return tiny_llava(seed)
    torch.manual_seed(seed)
    if family == "llava_next":
        config = T.LlavaNextConfig(
            vision_config=T.CLIPVisionConfig(**_VISION, projection_dim=32),
            text_config=T.LlamaConfig(**_TEXT),
            image_token_id=IMAGE_TOKEN,
            image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
            vision_feature_layer=-2,
        )
        model = T.LlavaNextForConditionalGeneration(config)
    elif family == "llava_onevision":
        config = T.LlavaOnevisionConfig(
            vision_config=T.SiglipVisionConfig(**_VISION),
            text_config=T.Qwen2Config(**_TEXT),
            image_token_id=IMAGE_TOKEN,
            video_token_id=998,
            image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]],
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
        model = T.LlavaOnevisionForConditionalGeneration(config)
    elif family == "qwen2_vl":
        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        config = T.Qwen2VLConfig(text_config=dict(_TEXT, rope_parameters=_MROPE), vision_config=vision, **_QWEN_IDS)
        model = T.Qwen2VLForConditionalGeneration(config)
    elif family == "qwen2_5_vl":
        vision = dict(
            depth=2,
            hidden_size=32,
            out_hidden_size=64,
            intermediate_size=64,
            num_heads=2,
            patch_size=14,
            window_size=56,
            fullatt_block_indexes=[1],
        )
        config = T.Qwen2_5_VLConfig(text_config=dict(_TEXT, rope_parameters=_MROPE), vision_config=vision, **_QWEN_IDS)
        model = T.Qwen2_5_VLForConditionalGeneration(config)
    elif family == "qwen3_vl":
        vision = dict(
            depth=2,
            hidden_size=32,
            out_hidden_size=64,
            intermediate_size=64,
            num_heads=2,
            patch_size=16,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        )
        text = dict(_TEXT, head_dim=16, rope_parameters={**_MROPE, "mrope_interleaved": True})
        model = T.Qwen3VLForConditionalGeneration(T.Qwen3VLConfig(text_config=text, vision_config=vision, **_QWEN_IDS))
    elif family in ("idefics3", "smolvlm"):
        vision = (T.Idefics3VisionConfig if family == "idefics3" else T.SmolVLMVisionConfig)(**_VISION).to_dict()
        config = (T.Idefics3Config if family == "idefics3" else T.SmolVLMConfig)(
            vision_config=vision, text_config=T.LlamaConfig(**_TEXT).to_dict(), scale_factor=2, image_token_id=IMAGE_TOKEN
        )
        model = (T.Idefics3ForConditionalGeneration if family == "idefics3" else T.SmolVLMForConditionalGeneration)(config)
    elif family == "internvl":
        vision = T.InternVLVisionConfig(**{**_VISION, "image_size": [32, 32], "patch_size": [8, 8]})
        config = T.InternVLConfig(
            vision_config=vision,
            text_config=T.Qwen2Config(**_TEXT),
            downsample_ratio=0.5,
            image_seq_length=4,
            image_token_id=IMAGE_TOKEN,
        )
        model = T.InternVLForConditionalGeneration(config)
    elif family == "gemma3":
        text = T.Gemma3TextConfig(**{**_TEXT, "head_dim": 16, "sliding_window": 16})
        config = T.Gemma3Config(
            text_config=text,
            vision_config=T.SiglipVisionConfig(**_VISION),
            mm_tokens_per_image=4,
            image_token_index=IMAGE_TOKEN,
            boi_token_index=996,
            eoi_token_index=997,
        )
        model = T.Gemma3ForConditionalGeneration(config)
    else:
        raise ValueError(family)
    return randomize(model, seed).eval()


def vlm_pixels(family: str, images: int, seed: int = 3) -> dict:
    """Pixel inputs for ``images`` images of a family's tiny config."""
    g = torch.Generator().manual_seed(seed)
    if family in ("llava_next", "llava_onevision"):  # 64x64 images: 4 crops and the base image
        return dict(pixel_values=torch.randn(images, 5, 3, 32, 32, generator=g), image_sizes=torch.tensor([[64, 64]] * images))
    if family.startswith("qwen"):
        p = 16 if family == "qwen3_vl" else 14
        return dict(
            pixel_values=torch.randn(images * 16, 3 * 2 * p * p, generator=g), image_grid_thw=torch.tensor([[1, 4, 4]] * images)
        )
    if family in ("idefics3", "smolvlm"):
        return dict(pixel_values=torch.randn(images, 1, 3, 32, 32, generator=g))
    return dict(pixel_values=torch.randn(images, 3, 32, 32, generator=g))


def vlm_image_tokens(model: nn.Module, family: str) -> int:
    with torch.no_grad():
        return model.model.get_image_features(**vlm_pixels(family, 1)).pooler_output[0].shape[0]


def vlm_inputs(model: nn.Module, family: str, texts: list[list[int]], side: str = "left", seed: int = 3) -> dict:
    """One image per prompt, after the text ``texts[i]``, the image tokens framed as the family's
    processor frames them, then two text tokens; padded on ``side``. Row ``i``'s image is drawn with
    seed ``seed + i``, so a row can be rebuilt alone."""
    n = vlm_image_tokens(model, family)
    framed = family.startswith("qwen") or family == "gemma3"
    image = ([996] if framed else []) + [IMAGE_TOKEN] * n + ([997] if framed else [])
    ids, mask = batch([list(t) + image + [7, 8] for t in texts], side)
    rows = [vlm_pixels(family, 1, seed + i) for i in range(len(texts))]
    kw = dict(input_ids=ids, attention_mask=mask, **{k: torch.cat([r[k] for r in rows]) for k in rows[0]})
    if family.startswith("qwen"):
        kw["mm_token_type_ids"] = (ids == IMAGE_TOKEN).long()
    if family == "gemma3":
        kw["token_type_ids"] = (ids == IMAGE_TOKEN).long()
    return kw


BATCH_TEXTS = [[1, 5], [1, 5, 6, 9, 4], [2, 3, 4], [6]]


def vlm_logits(model: nn.Module, kw: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**kw).logits


def vlm_generate(model: nn.Module, kw: dict, tokens: int = 3) -> torch.Tensor:
    """The ``tokens`` greedily generated after each prompt of ``kw``."""
    with torch.no_grad():
        return model.generate(**kw, max_new_tokens=tokens, do_sample=False)[:, -tokens:]


def _counted(kw: dict, family: str) -> dict:
    """``kw`` with the position ids ``generate`` gives a padded prompt (counted over real tokens), for
    a plain forward; Qwen computes its own from the mask."""
    if family.startswith("qwen"):
        return kw
    return {**kw, "position_ids": (kw["attention_mask"].cumsum(-1) - 1).clamp(min=0)}


def reduce_batch_and_singles(family: str, method: str, **config):
    """Reduce a batch of three prompts of different lengths and check each row against the row alone
    (generated tokens equal, last logits close) and that remove() restores the model; returns the
    batch's record."""
    model = tiny_vlm(family)
    kw = vlm_inputs(model, family, BATCH_TEXTS)
    before = vlm_logits(model, kw)
    tokenreduce.apply(model, method, **config)
    batched, last = vlm_generate(model, kw), vlm_logits(model, _counted(kw, family))[:, -1]
    rec = tokenreduce.record(model)
    for row in range(len(BATCH_TEXTS)):
        single = vlm_inputs(model, family, [BATCH_TEXTS[row]], seed=3 + row)
        assert torch.equal(vlm_generate(model, single), batched[row : row + 1]), f"row {row}"
        want = vlm_logits(model, _counted(single, family))[:, -1]
        torch.testing.assert_close(want, last[row : row + 1], rtol=1e-4, atol=1e-4)
    tokenreduce.remove(model)
    assert torch.equal(vlm_logits(model, kw), before)
    return rec


VIDEO_TOKEN = 998


def vlm_video(family: str, videos: int, frames: int = 4, seed: int = 7) -> dict:
    """Video inputs for ``videos`` videos of ``frames`` frames: Qwen2/2.5-VL ``frames`` temporal patches
    of 8x8 patches (4x4 tokens per frame after the merger), OneVision ``frames`` 32 px frames (2x2 tokens
    per frame after pooling, then one newline token per video)."""
    g = torch.Generator().manual_seed(seed)
    if family.startswith("qwen"):
        rows = torch.randn(videos * frames * 64, 3 * 2 * 14 * 14, generator=g)
        return dict(pixel_values_videos=rows, video_grid_thw=torch.tensor([[frames, 8, 8]] * videos))
    return dict(pixel_values_videos=torch.randn(videos, frames, 3, 32, 32, generator=g))


def vlm_video_tokens(family: str, frames: int = 4) -> int:
    return 16 * frames if family.startswith("qwen") else 4 * frames + 1


def vlm_video_inputs(
    family: str, texts: list[list[int]], frames: int = 4, side: str = "left", seed: int = 7, image: bool = False
) -> dict:
    """One video per prompt, after the text ``texts[i]`` (and, with ``image``, one image before the video,
    Qwen only), framed as the family's processor frames them, then two text tokens; padded on ``side``.
    Row ``i``'s video is drawn with seed ``seed + i`` (its image with ``3 + i``), so a row can be rebuilt alone."""
    qwen = family.startswith("qwen")
    video = ([996] if qwen else []) + [VIDEO_TOKEN] * vlm_video_tokens(family, frames) + ([997] if qwen else [])
    picture = [996, *[IMAGE_TOKEN] * 4, 997] if image else []
    ids, mask = batch([list(t) + picture + video + [7, 8] for t in texts], side)
    rows = [vlm_video(family, 1, frames, seed + i) for i in range(len(texts))]
    kw = dict(input_ids=ids, attention_mask=mask, **{k: torch.cat([r[k] for r in rows]) for k in rows[0]})
    if image:
        pics = [vlm_pixels(family, 1, 3 + i) for i in range(len(texts))]
        kw.update({k: torch.cat([p[k] for p in pics]) for k in pics[0]})
    if qwen:
        kw["mm_token_type_ids"] = (ids == IMAGE_TOKEN).long() + 2 * (ids == VIDEO_TOKEN).long()
    return kw
