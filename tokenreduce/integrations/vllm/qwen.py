"""Qwen2-VL / Qwen2.5-VL names that fail at start-up with the reason (:data:`MROPE_LIMITATION`), so a
deployment that asks for them learns why instead of serving wrong positions."""

from __future__ import annotations

from typing import NoReturn

from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from tokenreduce.integrations.vllm import MROPE_LIMITATION


def _unsupported(*args: object, **kwargs: object) -> NoReturn:
    raise NotImplementedError(MROPE_LIMITATION)


# The processing info is built in the front-end process when the engine starts: failing there stops it
# before any worker loads weights.
@MULTIMODAL_REGISTRY.register_processor(Qwen2VLMultiModalProcessor, info=_unsupported, dummy_inputs=Qwen2VLDummyInputsBuilder)
class TokenReduceQwen2VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    __init__ = _unsupported


@MULTIMODAL_REGISTRY.register_processor(
    Qwen2_5_VLMultiModalProcessor, info=_unsupported, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class TokenReduceQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    __init__ = _unsupported
