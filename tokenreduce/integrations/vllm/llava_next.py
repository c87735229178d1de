"""LLaVA-NeXT and LLaVA-OneVision under vLLM with a tokenreduce pre-LLM method (imported by vLLM through
the plugin's registry).

Both pack each image into one span: the base image's tokens, then its AnyRes crops unpadded to the
image's aspect ratio with one newline token per row (OneVision also downscales large images). The
processor emits ``packed_kept(method, n)`` placeholders per image, where ``n`` is vLLM's own
``get_num_image_tokens(image_width, image_height)``: a function of the image size and the budget only.
The model class packs the image as vLLM does, then returns the embeddings the method's ``select`` keeps
of that whole span (:func:`~tokenreduce.integrations.vllm.reduce_packed`), which is what
``tokenreduce.apply`` keeps of the image's span on the transformers model. OneVision's videos pass whole.
Relies on ``_process_image_input`` returning one packed ``[n, D]`` tensor per image (vLLM 0.32).
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextImageEmbeddingInputs,
    LlavaNextImageInputs,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageEmbeddingInputs,
    LlavaOnevisionImageInputs,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from tokenreduce.integrations.vllm import packed_kept, packed_method_from_config, reduce_packed


class TokenReduceLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    """LLaVA-NeXT's processing info with each image's packed span cut to the method's budget."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        tokens = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return packed_kept(packed_method_from_config(self.get_hf_config()), tokens)


class TokenReduceLlavaOnevisionProcessingInfo(LlavaOnevisionProcessingInfo):
    """LLaVA-OneVision's processing info with each image's packed span cut to the method's budget
    (videos keep their count: ``get_num_video_tokens`` does not read ``get_num_image_tokens``)."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        tokens = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return packed_kept(packed_method_from_config(self.get_hf_config()), tokens)


@MULTIMODAL_REGISTRY.register_processor(
    LlavaNextMultiModalProcessor, info=TokenReduceLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class TokenReduceLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT whose packed image embeddings are reduced by the method in the HF config's
    ``tokenreduce`` entry."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokenreduce_method = packed_method_from_config(self.config)

    def _process_image_input(self, image_input: LlavaNextImageInputs) -> torch.Tensor | list[torch.Tensor]:
        embeds = super()._process_image_input(image_input)
        if isinstance(image_input, LlavaNextImageEmbeddingInputs):
            return embeds  # given by the caller: the processor sized their placeholders from them
        return reduce_packed(self.tokenreduce_method, embeds)


@MULTIMODAL_REGISTRY.register_processor(
    LlavaOnevisionMultiModalProcessor,
    info=TokenReduceLlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class TokenReduceLlavaOnevisionForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision whose packed image embeddings are reduced by the method in the HF config's
    ``tokenreduce`` entry; videos pass whole."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokenreduce_method = packed_method_from_config(self.config)

    def _process_image_input(self, image_input: LlavaOnevisionImageInputs) -> torch.Tensor | list[torch.Tensor]:
        embeds = super()._process_image_input(image_input)
        if isinstance(image_input, LlavaOnevisionImageEmbeddingInputs):
            return embeds  # given by the caller: the processor sized their placeholders from them
        return reduce_packed(self.tokenreduce_method, embeds)
