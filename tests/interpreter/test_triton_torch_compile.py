"""torch.compile over the Triton ops (on CPU tensors, in the interpreter): one
graph with no break, the pyllm::<op>_triton node in it, and the same values
and gradients as eager under aot_eager (which traces the backward through the
fake kernels of the *_backward_triton ops)."""

import pytest
import torch

import pyllm

OPS = torch.ops.pyllm


def _calls(fn, *args):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, fullgraph=True, backend=record)(*args)
    assert len(graphs) == 1
    return [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]


def _same_as_eager(fn, *args):
    leaves = [a.detach().clone().requires_grad_() for a in args]
    eager = [a.detach().clone().requires_grad_() for a in args]
    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves)
    ref = fn(*eager)
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad)


CASES = {
    "attention": (lambda q, k, v: pyllm.attention(q, k, v, causal=True, backend="triton"),
                  lambda: (torch.randn(1, 9, 4, 32), torch.randn(1, 12, 2, 32),
                           torch.randn(1, 12, 2, 32)),
                  OPS.attention_triton.default),
    "rms_norm": (lambda x, w: pyllm.rms_norm(x, w, 1e-6, backend="triton"),
                 lambda: (torch.randn(5, 40), torch.randn(40)), OPS.rms_norm_triton.default),
    "layer_norm": (lambda x, w, b: pyllm.layer_norm(x, w, b, 1e-5, backend="triton"),
                   lambda: (torch.randn(5, 40), torch.randn(40), torch.randn(40)),
                   OPS.layer_norm_triton.default),
    "linear": (lambda x, w, b: pyllm.linear(x, w, b, "gelu", backend="triton"),
               lambda: (torch.randn(7, 24), torch.randn(20, 24), torch.randn(20)),
               OPS.linear_triton.default),
}


@pytest.mark.parametrize("name", list(CASES))
def test_one_graph_and_eager_values(name):
    fn, inputs, op = CASES[name]
    torch.manual_seed(0)
    args = inputs()
    assert _calls(fn, *args).count(op) == 1
    _same_as_eager(fn, *args)
