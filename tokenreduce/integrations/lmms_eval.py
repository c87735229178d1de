"""lmms-eval model ``tokenreduce``: a Hugging Face VLM with a tokenreduce method, configured by ``--model_args``.

    python -m lmms_eval --model tokenreduce \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=fastv,layer=2,keep_ratio=0.25 \\
        --tasks gqa,mme,pope,textvqa_val --batch_size 1 --output_path logs/

lmms-eval finds the model through the ``lmms_eval.models`` entry point that ``pip install tokenreduce[lmms]``
declares (payload: :func:`tokenreduce.integrations.lmms_eval_manifest`). ``pretrained`` is a hub id or a local folder, loaded with
``AutoModelForImageTextToText`` and ``AutoProcessor``. ``method`` (optional: without it the model runs
unpatched, the baseline row) and every ``model_args`` key that is not one of :data:`OWN_ARGS` go to
``tokenreduce.apply``; values are parsed as Python literals, so ``ratios=[0.5,0.25]`` is a tuple (use brackets:
lmms-eval splits ``model_args`` at commas outside brackets and quotes). A key the method does not take raises,
naming the method's config fields. Images only; ``loglikelihood`` and multi-round generation raise
``NotImplementedError``.

Each sample's ``token_counts.input_tokens`` is the prompt length the LLM's first layer read (after a pre-LLM
method), and :attr:`TokenReduceVLM.visual_tokens` holds, per request, its images' visual tokens before
reduction and those the last LLM layer read; the log reports their totals after each ``generate_until``.
"""

from __future__ import annotations

import ast
from typing import Any

import torch
from accelerate import Accelerator
from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages
from loguru import logger
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

import tokenreduce

# model_args the wrapper takes itself; every other key configures the method.
OWN_ARGS = (
    "pretrained",
    "method",
    "stage",
    "device",
    "dtype",
    "batch_size",
    "max_batch_size",
    "attn_implementation",
    "trust_remote_code",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_NEW_TOKENS = 256


def parse_config(config: dict[str, Any]) -> dict[str, Any]:
    """Method config from ``model_args``: strings that are Python literals become values (lists become tuples);
    lmms-eval has already turned plain numbers and ``true``/``false`` into ints, floats and bools."""
    parsed = {}
    for key, value in config.items():
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass  # a plain string such as positions=keep
        parsed[key] = tuple(value) if isinstance(value, list) else value
    return parsed


class TokenReduceVLM(lmms):
    """A Hugging Face image-text-to-text model patched with ``tokenreduce.apply(model, method, **config)``."""

    is_simple = False  # a chat model: requests carry the task's doc_to_messages

    def __init__(
        self,
        pretrained: str,
        method: str | None = None,
        stage: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,  # lmms-eval passes it to every model; batches here are batch_size
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        **config: Any,
    ) -> None:
        super().__init__()
        config = parse_config(config)
        built = None  # the method is checked before minutes go into loading the model
        if method is None:
            if config or stage is not None:
                raise TypeError(f"model_args {sorted(config) + (['stage'] if stage else [])} configure a method; add method=NAME")
        else:
            try:
                built = tokenreduce.make_method(method, stage=stage, **config)
            except TypeError as err:
                raise TypeError(f"{err} (the model's own model_args are {list(OWN_ARGS)})") from None

        self.accelerator = Accelerator()
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        if self._world_size > 1:  # `accelerate launch`: one model per process, lmms-eval shards the documents
            device = f"cuda:{self.accelerator.local_process_index}"
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or ("bfloat16" if self._device.type == "cuda" else "float32")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        self.model = AutoModelForImageTextToText.from_pretrained(
            pretrained, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **extra
        )
        self.model.to(self._device).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        self.processor.tokenizer.padding_side = "left"  # batched generation appends after the prompt
        if built is not None:
            tokenreduce.apply(self.model, built)
        self.method = method
        # per request, in the order served: (visual tokens before reduction, visual tokens the LLM's last layer read)
        self.visual_tokens: list[tuple[int, int]] = []

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "the tokenreduce model only generates: its methods rank tokens by the prompt's last token, which a "
            "scored continuation would change; use a generate_until task"
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the tokenreduce model does not implement multi-round generation")

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Answer each request: its task's messages through the processor's chat template, then ``generate``."""
        # batches share generation kwargs; the Collator restores the original order at the end
        args = [r.args for r in requests]
        ordered = utils.Collator(args, lambda a: (a[3], a[3]), group_fn=lambda a: a[2], grouping=True)
        results: list[GenerationResult] = []
        start = len(self.visual_tokens)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="tokenreduce responding")
        for chunk in ordered.get_batched(n=self.batch_size, batch_fn=None):
            _, doc_to_messages, gen_kwargs, doc_ids, tasks, splits = zip(*chunk)
            chats = [
                ChatMessages(messages=to_messages(self.task_dict[task][split][doc_id]))
                for to_messages, doc_id, task, split in zip(doc_to_messages, doc_ids, tasks, splits)
            ]
            results.extend(self._generate(chats, dict(gen_kwargs[0])))
            progress.update(len(chunk))
        progress.close()
        served = self.visual_tokens[start:]
        before, after = sum(b for b, _ in served), sum(a for _, a in served)
        logger.info(f"tokenreduce {self.method or 'none'}: {after} of {before} visual tokens read by the LLM's last layer")
        return ordered.get_original(results)

    def _generate(self, chats: list[ChatMessages], gen_kwargs: dict[str, Any]) -> list[GenerationResult]:
        images, per_row = [], []
        for chat in chats:
            chat_images, videos, audios = chat.extract_media()
            if videos or audios:
                raise NotImplementedError("the tokenreduce model takes images only; this task sends video or audio")
            images.extend(chat_images)
            per_row.append(len(chat_images))
        template = self.processor.apply_chat_template
        texts = [template(c.to_hf_messages(), tokenize=False, add_generation_prompt=True) for c in chats]
        inputs = self.processor(images=images or None, text=texts, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device, self.model.dtype)

        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = gen_kwargs.get("temperature") or 0
        sampling = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_p": gen_kwargs.get("top_p")}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=gen_kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
                num_beams=gen_kwargs.get("num_beams", 1),
                pad_token_id=pad,
                **sampling,
            )
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        llm_lengths = self._record_visual_tokens(inputs, per_row)
        results = []
        for row, tokens in enumerate(new_tokens):
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0] if stop else text
            counts = TokenCounts(input_tokens=llm_lengths[row], output_tokens=int((tokens != pad).sum()))
            results.append(GenerationResult(text=text, token_counts=counts))
        return results

    def _record_visual_tokens(self, inputs, images_per_row: list[int]) -> list[int]:
        """Per row, the prompt tokens the LLM's first layer read; appends each row's visual tokens (before
        reduction, read by the last layer) to :attr:`visual_tokens`."""
        if not tokenreduce.is_patched(self.model) or not any(images_per_row):
            image_token = getattr(self.model.config, "image_token_id", -1)
            visual = (inputs["input_ids"] == image_token).sum(1).tolist()
            self.visual_tokens.extend((int(v), int(v)) for v in visual)
            return [int(n) for n in inputs["attention_mask"].sum(1)]
        rec = tokenreduce.record(self.model)
        images = iter(rec.images)  # the prompt's images in order, row after row
        for count in images_per_row:
            row = [next(images) for _ in range(count)]
            self.visual_tokens.append((sum(i.placeholders for i in row), sum(i.kept for i in row)))
        return list(rec.llm_lengths)
