"""Where in a model a method acts."""

from __future__ import annotations

from enum import Enum


class Stage(str, Enum):
    """A point in a model where tokens can be reduced; adapters say which ones their family has."""

    ENCODER = "encoder"  # inside vision-encoder blocks, after attention and before the MLP
    PRE_LLM = "pre_llm"  # on the visual tokens of a VLM, between the vision encoder and the LLM
    LLM = "llm"  # inside a decoder layer of a VLM's LLM during prefill
    DENOISER = "denoiser"  # around the attention (and MLP) of a diffusion denoiser's blocks, shapes restored

    def __str__(self) -> str:
        return self.value
