"""Models for the command line: timm architectures by name, with random, hub or local weights."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import torch
from torch import nn

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
HUB_PROBE_TIMEOUT_S = 3.0


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be had (no network, not cached, refused by the hub)."""


def check_checkpoint_path(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path`` if it is a readable checkpoint file of a known format, else a ``ValueError``."""
    path = Path(path)
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"checkpoint {str(path)!r} must be one of {', '.join(CHECKPOINT_SUFFIXES)}")
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ValueError(f"checkpoint {str(path)!r} is not a readable file")
    return path


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hugging Face hub (or the proxy in front of it) opens within ``timeout``.

    huggingface_hub retries unreachable hosts for about a minute before giving up; this answers in seconds.
    """
    url = urllib.parse.urlsplit(hub_endpoint())
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urllib.parse.urlsplit(proxy)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _hub_offline() -> None:
    """Put huggingface_hub in offline mode for this process: cached weights still load, nothing is retried."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # already imported: it read the variable at import time
        constants.HF_HUB_OFFLINE = True


def timm_model_names() -> list[str]:
    try:
        import timm
    except ImportError:
        raise ValueError("timm models need timm: pip install 'tokenreduce[timm]'") from None
    return timm.list_models()


def create_timm_model(
    name: str,
    *,
    img_size: int | None = None,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """A timm model by name with random weights, the hub's pretrained ones, or a local ``checkpoint``.

    ``device="meta"`` builds the architecture alone (no weights, no download), to check a request
    before paying for it. Raises ``ValueError`` for an unknown name or checkpoint and
    :class:`WeightsUnavailable` when pretrained weights cannot be had.
    """
    import timm

    if name not in timm_model_names():
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models()")
    if pretrained and checkpoint is not None:
        raise ValueError("pass --pretrained or --checkpoint, not both")
    if device is not None and torch.device(device).type == "meta":
        pretrained, checkpoint = False, None
    kwargs = {} if img_size is None else {"img_size": img_size}
    reachable = not pretrained or hub_reachable()
    if not reachable:
        _hub_offline()
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            try:
                model = timm.create_model(name, pretrained=pretrained, **kwargs)
            except TypeError as err:
                if "img_size" not in str(err):
                    raise
                # not a ViT-style model: build it anyway so that apply() can say why it is unsupported
                model = timm.create_model(name, pretrained=pretrained)
    except Exception as err:
        if not pretrained:
            raise
        reach = "" if reachable else f" (the hub at {hub_endpoint()} cannot be reached from here)"
        raise WeightsUnavailable(
            f"could not load pretrained weights for {name!r} from the hub{reach}: {type(err).__name__}: {str(err).rstrip('.')}. "
            "Download them where the hub is reachable and pass --checkpoint PATH (.safetensors, .pth or .bin)"
        ) from err
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a local timm-style checkpoint (safetensors, or a torch file read with ``weights_only=True``)
    into ``model``, strictly. EMA weights are preferred when present, ``module.`` prefixes are stripped,
    the model family's timm converter runs (position embeddings resampled to the model's input size),
    and the classifier is resized to the checkpoint's (removed when the checkpoint has none)."""
    from timm.models import load_state_dict

    path = check_checkpoint_path(path)
    try:
        state = load_state_dict(str(path))
    except Exception as err:
        raise ValueError(f"could not read checkpoint {str(path)!r}: {type(err).__name__}: {err}") from err
    convert = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if convert is not None:
        state = convert(state, model)
    _match_classifier(model, state)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"checkpoint {str(path)!r} does not fit {type(model).__name__}: {err}") from err
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit {type(model).__name__}: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
        )


def _match_classifier(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        return
    key = next(name for name, p in model.named_parameters() if p is head.weight)
    if key not in state:
        model.reset_classifier(0)
    elif state[key].shape[0] != head.out_features:
        model.reset_classifier(state[key].shape[0])


def create_hf_tower(checkpoint: str | os.PathLike) -> nn.Module:
    """A Hugging Face vision tower (``CLIPVisionModel``, ``SiglipVisionModel``, ``Dinov2Model``,
    ``ViTModel``...) from a directory written by ``save_pretrained``."""
    path = Path(checkpoint)
    if not (path / "config.json").is_file():
        raise ValueError(f"checkpoint {str(path)!r} must be a directory written by save_pretrained (with config.json)")
    import transformers

    return transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()


def create_hf_vlm(name: str, *, pretrained: bool = False, checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """A Hugging Face VLM: a built-in random-weight shape by name (``llava-cpu``, ``llava-next-cpu``,
    ``llava-onevision-video-cpu``, ``mllama-cpu``: ``tokenreduce.bench.vlm.NAMED_VLMS``), a hub id with
    ``pretrained``, or a local directory written by ``save_pretrained`` as ``checkpoint``."""
    from tokenreduce.bench.vlm import NAMED_VLMS

    if pretrained and checkpoint is not None:
        raise ValueError("pass --pretrained or --checkpoint, not both")
    if checkpoint is not None:
        path = Path(checkpoint)
        if not (path / "config.json").is_file():
            raise ValueError(f"checkpoint {str(path)!r} must be a directory written by save_pretrained (with config.json)")
        import transformers

        return transformers.AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).eval()
    if name in NAMED_VLMS:
        if pretrained:
            raise ValueError(f"{name} is a random-weight shape; pass a hub id with --pretrained")
        return NAMED_VLMS[name].build(False)
    if not pretrained:
        raise ValueError(
            f"--model {name!r}: a hub VLM needs --pretrained (or --checkpoint DIR); the built-in ones are {', '.join(NAMED_VLMS)}"
        )
    reachable = hub_reachable()
    if not reachable:
        _hub_offline()
    import transformers

    try:
        return transformers.AutoModelForImageTextToText.from_pretrained(name).eval()
    except Exception as err:
        reach = "" if reachable else f" (the hub at {hub_endpoint()} cannot be reached from here)"
        raise WeightsUnavailable(
            f"could not load {name!r} from the hub{reach}: {type(err).__name__}: {str(err).rstrip('.')}. "
            "Save it with save_pretrained where the hub is reachable and pass --checkpoint DIR"
        ) from err
