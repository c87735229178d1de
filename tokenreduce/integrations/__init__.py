"""Plug-ins for the engines tokenreduce runs inside (lmms-eval, Ray Data, vLLM). Each module imports its engine,
so nothing here is imported by ``import tokenreduce``."""

from __future__ import annotations

from typing import Any


def lmms_eval_manifest() -> Any:
    """The ``lmms_eval.models`` entry-point payload: a ``ModelManifest`` registering
    :class:`tokenreduce.integrations.lmms_eval.TokenReduceVLM` as ``--model tokenreduce``.

    It lives here, not in that module, because lmms-eval loads entry points while ``lmms_eval.models`` is
    initialising, which importing that module (an ``lmms`` subclass) would start again."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="tokenreduce", chat_class_path="tokenreduce.integrations.lmms_eval.TokenReduceVLM")
