"""Backend choice (pyllm/backend.py): defaults, the three ways to name one,
and the errors when a named backend can't serve a call."""

import pytest
import torch

import pyllm
from harness import run_python
from pyllm import backend, reference

RMS_NORM_NATIVE = torch.ops.pyllm.rms_norm.default


def test_backends_lists_every_backend():
    statuses = pyllm.backends()
    assert list(statuses) == ["cpu", "cuda", "triton", "reference"]
    assert statuses["cpu"].available and statuses["reference"].available
    for status in statuses.values():
        assert status.detail


def test_default_is_the_cpu_kernel_for_cpu_tensors():
    assert backend.route("rms_norm", torch.ones(2, 3)) is RMS_NORM_NATIVE
    assert backend.route("rms_norm", torch.ones(2, 3, dtype=torch.bfloat16)) is RMS_NORM_NATIVE


def test_default_falls_back_to_reference_for_dtypes_no_kernel_takes():
    assert backend.route("rms_norm", torch.ones(2, 3, dtype=torch.float64)) is reference.rms_norm


def test_argument_beats_context_beats_default():
    x = torch.ones(2, 3)
    with pyllm.use_backend("reference"):
        assert backend.route("rms_norm", x) is reference.rms_norm
        assert backend.route("rms_norm", x, "cpu") is RMS_NORM_NATIVE
        with pyllm.use_backend("cpu"):
            assert backend.route("rms_norm", x) is RMS_NORM_NATIVE
            assert pyllm.current_backend() == "cpu"
        assert pyllm.current_backend() == "reference"
    assert backend.route("rms_norm", x) is RMS_NORM_NATIVE


def test_context_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown backend 'gpu'; expected one of cpu, cuda, triton"):
        with pyllm.use_backend("gpu"):
            pass


def test_environment_variable_names_the_backend():
    code = ("import torch, pyllm; from pyllm import backend, reference; "
            "print(backend.route('rms_norm', torch.ones(2, 3)) is reference.rms_norm)")
    result = run_python(code, env={"PYLLM_BACKEND": "reference"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
    result = run_python("import torch, pyllm; pyllm.rms_norm(torch.ones(2, 3))",
                        env={"PYLLM_BACKEND": "fast"})
    assert result.returncode != 0
    assert "pyllm.rms_norm (PYLLM_BACKEND): unknown backend 'fast'" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_gpu_backends_without_a_device_are_clear_errors(name):
    with pytest.raises(pyllm.BackendError) as info:
        pyllm.rms_norm(torch.ones(2, 3), backend=name)
    message = str(info.value)
    assert f"backend {name!r} (backend=) is not available" in message
    assert "no CUDA device" in message or "not built" in message or "not installed" in message
    assert "Available here for cpu torch.float32 inputs: cpu, reference" in message


def test_op_table_shows_where_each_backend_runs():
    row = backend.op_table()["rms_norm"]
    assert row["cpu"] == "cpu" and row["reference"] == "any device"
    if not torch.cuda.is_available() and pyllm.backends()["cuda"].detail.startswith("built"):
        assert row["cuda"] == "(cuda)"


def test_compiled_graph_holds_the_chosen_op_once():
    def fn(x):
        return pyllm.rms_norm(x, None, 1e-6, backend="cpu") * 2

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(fn, fullgraph=True, backend=record)(torch.randn(3, 8))
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count(RMS_NORM_NATIVE) == 1

    graphs.clear()
    with pyllm.use_backend("reference"):
        torch._dynamo.reset()
        torch.compile(lambda x: pyllm.rms_norm(x, None, 1e-6), fullgraph=True,
                      backend=record)(torch.randn(3, 8))
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert RMS_NORM_NATIVE not in targets
