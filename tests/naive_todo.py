"""ToDo written from the spec (section 1.2) and the reference's ``TokenMergeAttentionProcessor``, sharing no
code with tokenreduce: an attention processor on each ``attn1`` that resizes its input tokens on their grid
with ``F.interpolate`` (or ``F.avg_pool2d``), projects keys and values from them, and attends with Python
loops over images and heads."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def resize_tokens(x: torch.Tensor, grid: tuple[int, int], factor: int, method: str) -> torch.Tensor:
    """The reference's ``up_or_downsample`` on the true grid: ``[B, h * w, C] -> [B, h' * w', C]``."""
    b, _, c = x.shape
    h, w = grid
    new_h, new_w = max(1, h // factor), max(1, w // factor)
    image = x.reshape(b, h, w, c).permute(0, 3, 1, 2)
    if method == "avg_pool":
        kernel = (h // new_h, w // new_w)
        image = F.avg_pool2d(image, kernel_size=kernel, stride=kernel)
    else:
        image = F.interpolate(image, size=(new_h, new_w), mode=method)
    return image.permute(0, 2, 3, 1).reshape(b, new_h * new_w, c)


class NaiveToDoProcessor:
    """Self-attention whose keys and values come from the resized tokens (queries full)."""

    def __init__(self, shared: dict, factor: int, method: str):
        self.shared, self.factor, self.method = shared, factor, method

    def grid(self, n: int) -> tuple[int, int]:
        h, w = self.shared["grid"]
        for level in (1, 2, 4, 8):
            grid = (math.ceil(h / level), math.ceil(w / level))
            if grid[0] * grid[1] == n:
                return grid
        raise AssertionError(f"no level of the {h}x{w} grid has {n} tokens")

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        assert encoder_hidden_states is None and attention_mask is None
        assert attn.residual_connection is False and attn.rescale_output_factor == 1.0
        kv = resize_tokens(hidden_states, self.grid(hidden_states.shape[1]), self.factor, self.method)
        q, k, v = attn.to_q(hidden_states), attn.to_k(kv), attn.to_v(kv)
        heads = attn.heads
        d = q.shape[-1] // heads
        out = torch.zeros_like(q)
        for i in range(q.shape[0]):
            for head in range(heads):
                part = slice(head * d, (head + 1) * d)
                scores = q[i, :, part] @ k[i, :, part].T * attn.scale
                out[i, :, part] = scores.softmax(dim=-1) @ v[i, :, part]
        return attn.to_out[1](attn.to_out[0](out))


def install(model: torch.nn.Module, factors: dict[int, int], method: str = "nearest-exact") -> None:
    """Put the naive processor on ``attn1`` of the blocks at the levels in ``factors`` (level -> factor).

    The latent grid (cut into ``patch_size`` patches for a DiT) comes from a pre-hook on the model; a
    UNet block's level from where it sits: ``down_blocks[i]`` at ``2 ** i`` (each has a downsampler but
    the last), the mid block at the coarsest, ``up_blocks[i]`` mirrored."""
    shared: dict = {}
    patch = getattr(model.config, "patch_size", None) or 1

    def hook(module, args, kwargs):
        latent = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        shared["grid"] = (latent.shape[-2] // patch, latent.shape[-1] // patch)

    model.register_forward_pre_hook(hook, with_kwargs=True)
    for name, module in model.named_modules():
        if type(module).__name__ != "BasicTransformerBlock":
            continue
        level = _level(model, name)
        if factors.get(level, 1) > 1:
            module.attn1.set_processor(NaiveToDoProcessor(shared, factors[level], method))


def _level(model: torch.nn.Module, name: str) -> int:
    if not hasattr(model, "down_blocks"):
        return 1
    depth = len(model.down_blocks) - 1
    part, index = name.split(".")[:2]
    if part == "down_blocks":
        return 2 ** int(index)
    if part == "up_blocks":
        return 2 ** (depth - int(index))
    return 2**depth
