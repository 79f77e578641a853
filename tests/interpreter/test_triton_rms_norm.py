"""The Triton RMSNorm kernel on CPU tensors, in the Triton interpreter
(collected only with TRITON_INTERPRET=1; see tests/test_triton_interpreter.py).

bf16 is not interpreted: the interpreter computes bf16 arithmetic on raw bits
(an upstream bug), so bf16 is proven by compilation (tests/test_triton_compile.py).
"""

import pytest
import torch
import torch.nn.functional as F

import pyllm
from harness import check_rule, generator, noncontiguous, poisoned_outputs, randn
from pyllm import reference
from pyllm.kernels.rms_norm import SINGLE_PASS_BYTES

INTERPRETED_DTYPES = (torch.float32, torch.float16)


def test_triton_backend_serves_cpu_tensors_here():
    assert pyllm.backend.op_table()["rms_norm"]["triton"].startswith("cpu")


@pytest.mark.parametrize("weight", (True, False))
@pytest.mark.parametrize("dtype", INTERPRETED_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (7, 7), (3, 1000), (2, 3, 127),
                                   (2, SINGLE_PASS_BYTES // 4 + 17)], ids=str)
def test_forward(shape, dtype, weight):
    gen = generator("triton rms_norm", shape, dtype, weight)
    x = randn(shape, dtype, gen=gen, offset=0.5)
    w = randn(shape[-1:], dtype, gen=gen, offset=1.0) if weight else None
    with poisoned_outputs():
        y, rstd = torch.ops.pyllm.rms_norm_triton(x, w, 1e-5)
    truth, truth_rstd = reference.rms_norm(x.double(), w.double() if weight else None, 1e-5)
    check_rule(y, truth, F.rms_norm(x, shape[-1:], w, 1e-5))
    torch.testing.assert_close(rstd.double(), truth_rstd, rtol=1e-5, atol=0)


def test_forward_noncontiguous_through_the_public_function():
    gen = generator("triton rms_norm strided")
    x = noncontiguous(randn((5, 300), torch.float16, gen=gen))
    w = randn((300,), torch.float16, gen=gen)
    with poisoned_outputs():
        y = pyllm.rms_norm(x, w, 1e-6, backend="triton")
    check_rule(y, reference.rms_norm(x.double(), w.double(), 1e-6)[0],
               F.rms_norm(x, (300,), w, 1e-6))


def test_backward_without_a_triton_kernel_is_a_clear_error():
    x = torch.randn(3, 8, requires_grad=True)
    y = pyllm.rms_norm(x, None, 1e-6, backend="triton")
    with pytest.raises(RuntimeError, match="pyllm::rms_norm_backward_triton has no CPU kernel"):
        y.sum().backward()
