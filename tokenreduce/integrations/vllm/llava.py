"""LLaVA-1.5 under vLLM with a tokenreduce pre-LLM method (imported by vLLM through the plugin's registry).

The processor emits ``method.num_kept`` placeholders per image instead of the tower's count; the model
class runs vLLM's own tower and projector, then returns only the embeddings the method's ``select``
keeps, in placeholder order. Relies on ``LlavaForConditionalGeneration._process_image_input`` returning
``[images, tokens, hidden]`` for CLIP/SigLIP towers (vLLM 0.32).
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaImageInputs,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import InputProcessingContext

from tokenreduce.integrations.vllm import method_from_config, patch_grid
from tokenreduce.methods.visual import VisualContext


class TokenReduceLlavaProcessingInfo(LlavaProcessingInfo):
    """LLaVA's processing info with each image's token count cut to the method's budget."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        tokens = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        side = self.get_vision_encoder_info().get_patch_grid_length()
        return method_from_config(self.get_hf_config()).num_kept(tokens, patch_grid(tokens, side))


def _info(ctx: InputProcessingContext) -> TokenReduceLlavaProcessingInfo:
    config = ctx.get_hf_config()
    if config.vision_config.model_type == "pixtral":
        # Pixtral images have their own sizes and row-break tokens in the placeholder run.
        raise ValueError("TokenReduceLlavaForConditionalGeneration supports CLIP and SigLIP vision towers, not Pixtral")
    return TokenReduceLlavaProcessingInfo(ctx)


@MULTIMODAL_REGISTRY.register_processor(_build_llava_or_pixtral_hf_processor, info=_info, dummy_inputs=LlavaDummyInputsBuilder)
class TokenReduceLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA whose image embeddings are reduced by the method in the HF config's ``tokenreduce`` entry."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokenreduce_method = method_from_config(self.config)

    def _process_image_input(self, image_input: LlavaImageInputs) -> torch.Tensor:
        embeds = super()._process_image_input(image_input)
        if isinstance(image_input, LlavaImageEmbeddingInputs):
            return embeds  # given by the caller: the processor sized their placeholders from them
        images, tokens = embeds.shape[:2]
        vision = self.config.vision_config
        grid = patch_grid(tokens, vision.image_size // vision.patch_size)
        keep = self.tokenreduce_method.num_kept(tokens, grid)
        return self.tokenreduce_method.select(VisualContext(embeds, keep, 0, grid)).apply(embeds)
