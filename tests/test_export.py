"""Export: torch.export and ONNX (dynamo) reproduce eager outputs; torch.jit.trace refuses to record."""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

import tokenreduce
from conftest import build, images, output
from test_contract import DATA_DEPENDENT_COUNTS, REDUCING

LAYOUTS = ["vit", "dinov2_reg", "deit_distilled", "hf_clip"]


def exported_inputs():
    # Exported with one batch, checked on another batch of other images: nothing of the example
    # input (which tokens merged) may be frozen into the graph.
    return images(batch=2, seed=1), images(batch=3, seed=7)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", sorted(REDUCING))
def test_torch_export_matches_eager(method, layout):
    if method in DATA_DEPENDENT_COUNTS:
        pytest.skip(DATA_DEPENDENT_COUNTS[method])
    model = tokenreduce.apply(build(layout), method, **REDUCING[method])
    example, check = exported_inputs()
    program = torch.export.export(model, (example,), dynamic_shapes=({0: Dim("batch")},))
    got = program.module()(check)
    got = got if isinstance(got, torch.Tensor) else got.last_hidden_state
    torch.testing.assert_close(got, output(model, check), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", sorted(REDUCING))
def test_onnx_export_runs_in_onnxruntime(method, tmp_path):
    if method in DATA_DEPENDENT_COUNTS:
        pytest.skip(DATA_DEPENDENT_COUNTS[method])
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = tokenreduce.apply(build("dinov2_reg"), method, **REDUCING[method])
    example, check = exported_inputs()
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (example,), path, dynamo=True, dynamic_shapes=({0: Dim("batch")},), verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: check.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(check), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", sorted(set(REDUCING) - {"none"}))
def test_jit_trace_refuses_to_record_reduction(method):
    model = tokenreduce.apply(build("vit"), method, **REDUCING[method])
    with pytest.raises(RuntimeError, match=r"torch.jit.trace .* cannot record token reduction; use torch.export.export"):
        torch.jit.trace(model, (images(),))


def test_legacy_onnx_exporter_says_to_use_dynamo(tmp_path):
    model = tokenreduce.apply(build("vit"), "tome", r=4)
    with pytest.raises(Exception, match=r"cannot record token reduction; .*dynamo=True"):
        torch.onnx.export(model, (images(),), tmp_path / "m.onnx", dynamo=False)


def test_jit_trace_of_the_identity_method_still_works():
    model, x = build("vit"), images()
    with torch.no_grad():
        expected = model(x)
    tokenreduce.apply(model, "none")
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,))
        assert torch.equal(traced(x), expected)
