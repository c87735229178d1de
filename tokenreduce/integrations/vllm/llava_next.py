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

from typing import ClassVar

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextImageEmbeddingInputs,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageEmbeddingInputs,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from tokenreduce.integrations.vllm import packed_kept, packed_method_from_config, reduce_packed


class PackedKeptInfo:
    """Mixed in front of a processing info: each image's packed span cut to the method's budget."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        tokens = super().get_num_image_tokens(image_width=image_width, image_height=image_height)  # type: ignore[misc]
        return packed_kept(packed_method_from_config(self.get_hf_config()), tokens)  # type: ignore[attr-defined]


class PackedReduction:
    """Mixed in front of a vLLM model class: its packed image embeddings reduced by the method in the HF
    config's ``tokenreduce`` entry (embeddings given by the caller pass: their placeholders were sized
    from them)."""

    embedding_inputs: ClassVar[type]

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        self.tokenreduce_method = packed_method_from_config(self.config)  # type: ignore[attr-defined]

    def _process_image_input(self, image_input: object) -> torch.Tensor | list[torch.Tensor]:
        embeds = super()._process_image_input(image_input)  # type: ignore[misc]
        if isinstance(image_input, self.embedding_inputs):
            return embeds
        return reduce_packed(self.tokenreduce_method, embeds)


class TokenReduceLlavaNextProcessingInfo(PackedKeptInfo, LlavaNextProcessingInfo):
    """LLaVA-NeXT's processing info with each image's packed span cut to the method's budget."""


class TokenReduceLlavaOnevisionProcessingInfo(PackedKeptInfo, LlavaOnevisionProcessingInfo):
    """LLaVA-OneVision's processing info with each image's packed span cut to the method's budget
    (videos keep their count: ``get_num_video_tokens`` does not read ``get_num_image_tokens``)."""


@MULTIMODAL_REGISTRY.register_processor(
    LlavaNextMultiModalProcessor, info=TokenReduceLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class TokenReduceLlavaNextForConditionalGeneration(PackedReduction, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT whose packed image embeddings are reduced by the method in the HF config's
    ``tokenreduce`` entry."""

    embedding_inputs = LlavaNextImageEmbeddingInputs


@MULTIMODAL_REGISTRY.register_processor(
    LlavaOnevisionMultiModalProcessor,
    info=TokenReduceLlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class TokenReduceLlavaOnevisionForConditionalGeneration(PackedReduction, LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision whose packed image embeddings are reduced by the method in the HF config's
    ``tokenreduce`` entry; videos pass whole."""

    embedding_inputs = LlavaOnevisionImageEmbeddingInputs
