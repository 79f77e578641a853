"""Per-call cost of an op's autograd wiring: the measurement behind the choice
of one build per torch minor release over torch's stable ABI (README,
"Supported torch").

Ops registered through the stable ABI (STABLE_TORCH_LIBRARY) can't carry a
C++ autograd kernel: their backward would be wired in Python
(torch.library.register_autograd, an autograd.Function underneath). This
times a 1x4096 rms_norm forward+backward, the call where wiring dominates,
both ways on the same kernels:

- "C++ autograd" (today): torch.ops.pyllm.rms_norm's Autograd kernel in C++;
- "Python autograd": an autograd.Function calling the same forward and
  backward ops, as the stable-ABI build would have to.

Interleaved, medians of several rounds; outputs allocated per call.

    .venv/bin/python bench/autograd_overhead.py [--rows 1] [--hidden 4096]
"""

import argparse
import statistics
import time

import torch

import pyllm  # noqa: F401  (loads the operators)

ops = torch.ops.pyllm


class PythonAutogradRMSNorm(torch.autograd.Function):
    """rms_norm with its backward wired in Python, as register_autograd does."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = ops.rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_w = ops.rms_norm_backward(grad_y, x, rstd, weight, None,
                                               [ctx.needs_input_grad[0], ctx.needs_input_grad[1]])
        return grad_x, grad_w, None


def cpp_autograd(x, w, g):
    y, _ = ops.rms_norm(x, w, 1e-6)
    y.backward(g)


def python_autograd(x, w, g):
    y = PythonAutogradRMSNorm.apply(x, w, 1e-6)
    y.backward(g)


def per_call_us(fn, args, calls):
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - start) / calls * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    x = torch.randn(args.rows, args.hidden, dtype=dtype, requires_grad=True)
    w = torch.randn(args.hidden, dtype=dtype, requires_grad=True)
    g = torch.randn(args.rows, args.hidden, dtype=dtype)
    ways = {"C++ autograd": cpp_autograd, "Python autograd": python_autograd}
    for fn in ways.values():  # same gradients both ways, then warm up
        x.grad = w.grad = None
        fn(x, w, g)
    samples = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, fn in ways.items():
            samples[name].append(per_call_us(fn, (x, w, g), args.calls))
    base = statistics.median(samples["C++ autograd"])
    print(f"rms_norm {args.rows}x{args.hidden} {args.dtype} forward+backward, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} "
          f"rounds x {args.calls} calls")
    for name, values in samples.items():
        med = statistics.median(values)
        print(f"  {name:<16} {med:8.2f} us/call  ({med / base:.2f}x)")


if __name__ == "__main__":
    main()
