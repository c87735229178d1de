"""Two methods in one model: one before the LLM (or in its vision encoder), then one inside it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tokenreduce.methods.base import Method
from tokenreduce.methods.llm import LLMMethod
from tokenreduce.methods.visual import VisualMethod
from tokenreduce.stages import Stage


@dataclass
class Stack(Method):
    """``before`` reduces each image before the LLM (a pre-LLM method), then ``inside``
    prunes inside the LLM among the tokens ``before`` kept (e.g. VisionZip to 192 tokens, then FastV
    at layer 2). Built by ``tokenreduce.apply(model, [first, second])``."""

    before: VisualMethod
    inside: LLMMethod

    stage = Stage.LLM

    def __post_init__(self) -> None:
        if not isinstance(self.inside, LLMMethod):
            raise TypeError(f"the second of two stacked methods must act inside the LLM (stage llm), got {self.inside.name!r}")
        if self.before.stage != Stage.PRE_LLM:
            raise TypeError(
                f"the first of two stacked methods must act between the vision side and the LLM (stage pre_llm), "
                f"got {self.before.name!r} at stage {self.before.stage}"
            )

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.before.name}+{self.inside.name}"

    @property
    def paper(self) -> str:  # type: ignore[override]
        return f"{self.before.paper}; {self.inside.paper}"

    def params(self) -> dict[str, Any]:
        return {self.before.name: self.before.params(), self.inside.name: self.inside.params()}

    def __str__(self) -> str:
        return f"{self.before} then {self.inside}"


@dataclass
class PresetStack(Stack):
    """A stack registered under one name (ToDRE, VisionDrop, HoliTom, ...): its own config fields build
    ``before`` and ``inside`` in ``__post_init__`` (then ``super().__post_init__()``), and it reports and
    prints that config as a single method does."""

    before: VisualMethod = field(init=False, repr=False)
    inside: LLMMethod = field(init=False, repr=False)

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def __str__(self) -> str:
        return Method.__str__(self)


def parts(method: Method) -> tuple[Method | None, LLMMethod | None]:
    """``(the part acting before the LLM, the part acting inside it)`` of any method."""
    if isinstance(method, Stack):
        return method.before, method.inside
    if isinstance(method, LLMMethod):
        return None, method
    return method, None
