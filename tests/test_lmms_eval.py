"""The lmms-eval model ``tokenreduce`` (tokenreduce/integrations/lmms_eval.py), offline: a tiny random LLaVA and
its processor saved to a folder, and a two-document local task run through lmms-eval's own evaluator."""

from __future__ import annotations

import json
import sys
import textwrap
from importlib.metadata import entry_points

import numpy as np
import pytest

from conftest import IMAGE_TOKEN, tiny_llava, tiny_vlm

# Not in the dev extra: lmms-eval 0.7.3 pins wandb 0.25, which needs protobuf < 7 (onnx runs on 7 here).
pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'tokenreduce[lmms]')")
from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

from tokenreduce.integrations import lmms_eval_manifest  # noqa: E402
from tokenreduce.integrations.lmms_eval import TokenReduceVLM, parse_config  # noqa: E402

MODEL_ID = "tokenreduce"
WORDS = ["USER", "ASSISTANT", ":", "what", "is", "this", "?", "yes", "no"]
QWEN_TOKENS = {"<|vision_start|>": 996, "<|vision_end|>": 997, "<|video_pad|>": 998, "<|image_pad|>": IMAGE_TOKEN}


def _template(image: str) -> str:
    return (
        "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
        f"{{% if c['type'] == 'image' %}}{image} {{% else %}}{{{{ c['text'] }}}} {{% endif %}}{{% endfor %}}{{% endfor %}}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )


def _tokenizer(special: dict[str, int]):
    """A word-level tokenizer over the tiny models' 1000 ids that needs no hub: ``special`` tokens, the words of
    the prompt, and ``w<id>`` for every other id (what random weights answer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **special}
    vocab.update({w: 4 + i for i, w in enumerate(WORDS)})
    vocab.update({f"w{i}": i for i in range(4 + len(WORDS), 1000) if i not in special.values()})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": list(special)})
    return fast


def _llava_processor():
    """LLaVA-1.5's processor with a CLIP image processor at 32 px: 16 visual tokens per image."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    return LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=_tokenizer({"<image>": IMAGE_TOKEN}),
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_template("<image>"),
    )


def _qwen2_vl_processor():
    """Qwen2-VL's processor: the task's 40 x 48 px images become 56 x 84 px (its 3136-pixel minimum), 4 x 6 patches
    of 14 px merged 2 x 2 into 6 visual tokens."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        video_processor=Qwen2VLVideoProcessor(),
        tokenizer=_tokenizer(QWEN_TOKENS),
        chat_template=_template("<|vision_start|><|image_pad|><|vision_end|>"),
    )


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llava")
    tiny_llava().save_pretrained(path)
    _llava_processor().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_qwen2_vl_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2_vl")
    tiny_vlm("qwen2_vl").save_pretrained(path)
    _qwen2_vl_processor().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_task_dir(tmp_path_factory):
    """A generate_until task over a local JSON-lines file of two images (lmms-eval's task YAML, offline)."""
    from PIL import Image

    path = tmp_path_factory.mktemp("tiny_task")
    rng = np.random.default_rng(0)
    with open(path / "data.jsonl", "w") as f:
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path / f"{i}.png")
            f.write(json.dumps({"image": str(path / f"{i}.png"), "question": "what is this ?", "answer": "yes"}) + "\n")
    (path / "tiny_utils.py").write_text(
        textwrap.dedent(
            """
            from PIL import Image

            def doc_to_visual(doc):
                return [Image.open(doc["image"]).convert("RGB")]

            def doc_to_text(doc):
                return doc["question"]

            def process_results(doc, results):
                return {"exact_match": float(results[0].strip() == doc["answer"])}
            """
        )
    )
    (path / "tokenreduce_tiny.yaml").write_text(
        textwrap.dedent(
            f"""
            task: tokenreduce_tiny
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {path / "data.jsonl"}
            test_split: test
            output_type: generate_until
            doc_to_visual: !function tiny_utils.doc_to_visual
            doc_to_text: !function tiny_utils.doc_to_text
            doc_to_target: answer
            generation_kwargs:
              max_new_tokens: 3
              do_sample: false
            process_results: !function tiny_utils.process_results
            metric_list:
              - metric: exact_match
                aggregation: mean
                higher_is_better: true
            """
        )
    )
    return path


@pytest.fixture(scope="module")
def tasks(tiny_task_dir):
    """lmms-eval's task index of the tiny task alone (indexing its hundreds of built-in tasks takes seconds)."""
    return TaskManager(include_path=str(tiny_task_dir), include_defaults=False)


def _evaluate(model, tasks: TaskManager, model_args: str = ""):
    return simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["tokenreduce_tiny"],
        limit=2,
        device="cpu",
        batch_size=2,
        task_manager=tasks,
        log_samples=True,
    )


def _declared() -> bool:
    """Whether the installed tokenreduce declares this checkout's entry point (an older install may not)."""
    return any(ep.name == MODEL_ID for ep in entry_points(group="lmms_eval.models"))


def test_entry_point_registers_the_chat_model():
    from lmms_eval.models import get_model

    assert lmms_eval_manifest().chat_class_path == "tokenreduce.integrations.lmms_eval.TokenReduceVLM"
    if not _declared():
        pytest.skip("tokenreduce is installed without this checkout's entry points (pip install -e . again)")
    ep = next(ep for ep in entry_points(group="lmms_eval.models") if ep.name == MODEL_ID)
    assert ep.value == "tokenreduce.integrations:lmms_eval_manifest"
    assert get_model(MODEL_ID) is TokenReduceVLM


def test_imports_in_a_fresh_process():
    """``import tokenreduce`` imports no lmms-eval; importing the model module first still registers it (lmms-eval
    loads entry points while its models package initialises)."""
    import subprocess

    code = (
        "import sys, tokenreduce\n"
        "assert 'lmms_eval' not in sys.modules and 'tokenreduce.integrations' not in sys.modules\n"
        "from tokenreduce.integrations.lmms_eval import TokenReduceVLM\n"
        "from lmms_eval.models import get_model\n"
        f"assert {not _declared()} or get_model('tokenreduce') is TokenReduceVLM\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_model_args_are_parsed_as_literals():
    assert parse_config({"ratios": "[0.5,0.25]", "positions": "keep", "layer": 2, "layers": "None"}) == {
        "ratios": (0.5, 0.25),
        "positions": "keep",
        "layer": 2,
        "layers": None,
    }


def test_evaluates_through_the_registered_name_with_a_pre_llm_method(tiny_llava_dir, tasks):
    """``--model tokenreduce --model_args pretrained=DIR,method=divprune,keep_tokens=4``: both documents
    answered, and the LLM read 4 of each image's 16 visual tokens."""
    if not _declared():
        pytest.skip("tokenreduce is installed without this checkout's entry points (pip install -e . again)")
    out = _evaluate(MODEL_ID, tasks, f"pretrained={tiny_llava_dir},method=divprune,keep_tokens=4")
    assert out["results"]["tokenreduce_tiny"]["exact_match,none"] == 0.0  # random weights never say "yes"
    samples = out["samples"]["tokenreduce_tiny"]
    assert len(samples) == 2
    prompt = 8 + 16  # USER : <16 image tokens> what is this ? ASSISTANT :
    assert [s["token_counts"][0]["input_tokens"] for s in samples] == [prompt - 16 + 4] * 2


def test_in_llm_method_from_model_args(tiny_llava_dir, tasks):
    """fastv from a model_args string (as lmms-eval's CLI passes it): 4 of each image's 16 visual tokens reach
    the LLM's last layer, and answers stop at the task's max_new_tokens."""
    lm = TokenReduceVLM.create_from_arg_string(f"pretrained={tiny_llava_dir},method=fastv,layer=2,keep_ratio=0.25")
    out = _evaluate(lm, tasks)
    assert len(out["samples"]["tokenreduce_tiny"]) == 2
    assert lm.visual_tokens == [(16, 4), (16, 4)]
    assert all(s["token_counts"][0]["output_tokens"] <= 3 for s in out["samples"]["tokenreduce_tiny"])


def test_qwen2_vl(tiny_qwen2_vl_dir, tasks):
    """M-RoPE family: DivPrune keeps 2 of each image's 6 visual tokens, and the LLM reads 4 fewer tokens."""
    lm = TokenReduceVLM.create_from_arg_string(f"pretrained={tiny_qwen2_vl_dir},method=divprune,keep_tokens=2,batch_size=2")
    out = _evaluate(lm, tasks)
    assert lm.visual_tokens == [(6, 2), (6, 2)]
    prompt = 8 + 2 + 6  # the words, vision start and end, 6 image tokens
    assert [s["token_counts"][0]["input_tokens"] for s in out["samples"]["tokenreduce_tiny"]] == [prompt - 4] * 2


def test_without_a_method_the_model_runs_unpatched(tiny_llava_dir, tasks):
    lm = TokenReduceVLM.create_from_arg_string(f"pretrained={tiny_llava_dir}")
    _evaluate(lm, tasks)
    assert lm.visual_tokens == [(16, 16), (16, 16)]


def test_bad_model_args_name_the_allowed_keys(tiny_llava_dir):
    with pytest.raises(TypeError, match=r"unknown config \['keep'\].*accepts.*keep_ratio.*own model_args.*pretrained"):
        TokenReduceVLM.create_from_arg_string(f"pretrained={tiny_llava_dir},method=fastv,keep=0.25")
    with pytest.raises(TypeError, match=r"configure a method; add method=NAME"):
        TokenReduceVLM.create_from_arg_string(f"pretrained={tiny_llava_dir},keep_ratio=0.25")
    with pytest.raises(ValueError, match=r"dtype must be one of"):
        TokenReduceVLM.create_from_arg_string(f"pretrained={tiny_llava_dir},dtype=fp8")
