"""More than 2**31 elements (bf16, about 4.3 GB a tensor) on the CPU kernels,
which index in 64 bits: RMSNorm forward and backward, LayerNorm forward,
linear with M*K, M*N and K*N each past 2**31, and attention with
batch*seq*heads*head_dim past 2**31. Rows on both sides of the 2**31st
element are held to the harness rule against the float64 reference (a 32-bit
offset would wrap there and read or write the wrong memory). The GPU
backends refuse such sizes with a named error before touching memory
(tests/test_linear.py, tests/test_norms.py, tests/test_attention.py check
the messages)."""

import gc

import pytest
import torch
import torch.nn.functional as F

import pyllm
from harness import check_rule
from pyllm import reference

pytestmark = pytest.mark.slow

LIMIT = 2**31
BF16 = torch.bfloat16


#: Large tensors repeat a random block of this many elements: an odd period
#: (coprime to every power of two), so an offset wrapped at 2**31 or 2**32
#: elements or bytes lands on other values; filling by copies of the block
#: takes ~1 s a tensor where drawing 2**31 random numbers takes ~20 s.
PERIOD = (1 << 20) + 7


def filled(shape, seed, scale=1.0):
    """A bf16 tensor of ``shape``, uniform in [-scale, scale], periodic with
    ``PERIOD`` elements when larger than that."""
    t = torch.empty(shape, dtype=BF16)
    flat, size = t.view(-1), min(t.numel(), PERIOD)
    block = torch.empty(size, dtype=BF16)
    block.uniform_(-scale, scale, generator=torch.Generator().manual_seed(seed))
    whole = t.numel() // size * size
    flat[:whole].view(-1, size).copy_(block.expand(whole // size, -1))
    flat[whole:].copy_(block[:t.numel() - whole])
    return t


def around_limit(rows: int, per_row: int) -> list[int]:
    """Row indices: the first, those around the row holding element 2**31, the last."""
    at = LIMIT // per_row
    picked = {0, 1, at - 1, at, at + 1, rows - 2, rows - 1}
    return sorted(i for i in picked if 0 <= i < rows)


@pytest.fixture(autouse=True)
def free_memory():
    yield
    gc.collect()


def test_rms_norm_forward_and_backward():
    n = 1024
    rows = LIMIT // n + 5
    x, w = filled((rows, n), 1), filled((n,), 2, 2.0)
    y, rstd = torch.ops.pyllm.rms_norm(x, w, 1e-5)
    pick = around_limit(rows, n)
    check_rule(y[pick], reference.rms_norm(x[pick].double(), w.double(), 1e-5)[0],
               F.rms_norm(x[pick], (n,), w, 1e-5))
    del y
    dy = filled((rows, n), 3)
    dx, dw = torch.ops.pyllm.rms_norm_backward(dy, x, rstd, w, None, [True, False])
    leaves = [x[pick].double().requires_grad_(), w.double()]
    reference.rms_norm(*leaves, 1e-5)[0].backward(dy[pick].double())
    theirs = x[pick].clone().requires_grad_()
    F.rms_norm(theirs, (n,), w, 1e-5).backward(dy[pick])
    check_rule(dx[pick], leaves[0].grad, theirs.grad, factor=3, what="grad x")


def test_layer_norm_forward():
    n = 4096
    rows = LIMIT // n + 3
    x, w, b = filled((rows, n), 4), filled((n,), 5), filled((n,), 6)
    y = pyllm.layer_norm(x, w, b, 1e-5)
    pick = around_limit(rows, n)
    check_rule(y[pick], reference.layer_norm(x[pick].double(), w.double(), b.double(), 1e-5)[0],
               F.layer_norm(x[pick], (n,), w, b, 1e-5))


@pytest.mark.parametrize("case", ["M*K", "M*N", "K*N"])
def test_linear(case):
    if case == "M*K":       # x past 2**31: a tall input, few outputs
        m, k, n = LIMIT // 2048 + 3, 2048, 8
    elif case == "M*N":     # the output past 2**31
        m, k, n = LIMIT // 4096 + 3, 16, 4096
    else:                   # the weight past 2**31: a huge LM head on two rows
        m, k, n = 2, 8192, LIMIT // 8192 + 3
    x = filled((m, k), 7)
    w = filled((n, k), 8, k ** -0.5)
    b = filled((n,), 9)
    y = pyllm.linear(x, w, b, "gelu")
    assert y.shape == (m, n)
    if case == "K*N":       # output columns around the weight's 2**31st element
        cols = around_limit(n, k)
        truth = reference.linear(x.double(), w[cols].double(), b[cols].double(), "gelu")
        check_rule(y[:, cols], truth, F.gelu(F.linear(x, w[cols], b[cols])))
    else:
        rows = around_limit(m, k if case == "M*K" else n)
        truth = reference.linear(x[rows].double(), w.double(), b.double(), "gelu")
        check_rule(y[rows], truth, F.gelu(F.linear(x[rows], w, b)))


def test_attention_batch_past_limit():
    """batch * seq * heads * head_dim > 2**31 (each sequence far below): MQA
    keeps k and v small."""
    seq, heads, d = 32, 8, 128
    batch = LIMIT // (seq * heads * d) + 2
    q = filled((batch, seq, heads, d), 10)
    k = filled((batch, seq, 1, d), 11)
    v = filled((batch, seq, 1, d), 12)
    out = pyllm.attention(q, k, v, causal=True)
    pick = around_limit(batch, seq * heads * d)
    truth = reference.attention(q[pick].double(), k[pick].double(), v[pick].double(),
                                causal=True)[0]
    from test_attention import pytorch_attention
    check_rule(out[pick], truth, pytorch_attention(q[pick], k[pick], v[pick], causal=True))


class _OnCuda:
    """Stands in for a CUDA tensor of a shape (nothing is allocated)."""

    def __init__(self, *shape):
        self.shape = torch.Size(shape)
        self.device = torch.device("cuda")


@pytest.mark.parametrize("shape, out_features, what", [
    ((2**20 + 1, 2048), 8, "x"),
    ((2**20, 16), 4096, "the output"),
    ((2, 8192), LIMIT // 8192 + 3, "the weight"),
])
def test_gpu_backends_refuse_before_touching_memory(shape, out_features, what):
    """On a CUDA device an operand of the GEMMs past 2**31 - 1 elements is a
    named error, raised before any kernel runs."""
    from pyllm.ops.linear import _check_sizes
    with pytest.raises(ValueError, match=f"{what} would have .* 32-bit"):
        _check_sizes("pyllm.linear", _OnCuda(*shape), out_features)
    _check_sizes("pyllm.linear", type("OnCpu", (), {"shape": torch.Size(shape),
                                                    "device": torch.device("cpu")}),
                 out_features)  # the CPU kernels take it
