"""NaN and Inf follow PyTorch's semantics (tests/nonfinite.py states the rule)
in the CUDA kernels, run on the host through the CUDA execution model of
tests/cuda_host/ and composed the way the CUDA operators compose them: every
op, fp16 and bf16, forward and backward, one NaN, +inf or -inf in each input
(and in the output's gradient) in turn; attention plain, causal, with a bias
that masks a whole row, and on the split-KV decode path."""

import pytest
import torch

from nonfinite import NORM_OPS, attention_cases, bounds, check, linear_cases, norm_cases
from test_cuda_host_attention import HostAttention
from test_cuda_host_linear import linear, linear_backward, swiglu, swiglu_backward
from test_cuda_host_norms import host_backward, host_forward
from test_norms import Norm

GPU_DTYPES = (torch.float16, torch.bfloat16)
CASES = attention_cases(GPU_DTYPES) + norm_cases(GPU_DTYPES) + linear_cases(GPU_DTYPES)


def run_host(case):
    """The op's outputs and gradients from the host-model kernels, named as in the bounds."""
    i = case.inputs
    if case.op == "attention":
        call = HostAttention(i["q"], i["k"], i["v"], bias=case.options["bias"],
                             causal=case.options["causal"])
        out, lse = call.forward()
        dq, dk, dv = call.backward(out, lse, i["grad"])
        return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    if case.op in NORM_OPS:
        norm = Norm(case.op)
        eps = case.options["eps"]
        y, total, mean, rstd = host_forward(norm, i["x"], i.get("residual"), i["weight"],
                                            i.get("bias"), eps)
        normalised = total if norm.fused else i["x"]
        grad_sum = torch.zeros_like(i["x"]) if norm.fused else None
        dx, dw, db = host_backward(norm, i["grad"], normalised, mean, rstd, i["weight"], grad_sum,
                                   want_bias="bias" in i)
        result = {"y": y, "dx": dx, "dweight": dw}
        if norm.fused:
            result.update(sum=total, dresidual=dx)
        if "bias" in i:
            result["dbias"] = db
        return result
    if case.op == "swiglu":
        args = [i[n] for n in ("x", "weight_gate", "weight_up", "bias_gate", "bias_up")]
        grads = swiglu_backward(i["grad"], *args)
        names = ("dx", "dweight_gate", "dweight_up", "dbias_gate", "dbias_up")
        return {"y": swiglu(*args), **dict(zip(names, grads))}
    act = case.op.split("-", 1)[1]
    dx, dw, db = linear_backward(i["grad"], i["x"], i["weight"], i["bias"], act)
    return {"y": linear(i["x"], i["weight"], i["bias"], act), "dx": dx, "dweight": dw,
            "dbias": db}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_nan_and_inf_follow_pytorch(case):
    check(case, run_host(case), *bounds(case))
