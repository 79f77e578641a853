"""The one list of benchmark cases, shared by ``pyllm bench`` and ``bench/``.

Shapes come from real models: GPT-2 small (hidden 768), a 1B-class LLaMA
(hidden 2048, as Llama-3.2-1B), BERT-base (hidden 768), plus the 4096-wide
rows that large models and the project's CPU targets use. Each op has an
:class:`OpBench` that makes inputs, runs pyllm with a backend, gives PyTorch's
eager baseline (``torch.compile`` of that baseline is timed too) and the
float64 truth used by the correctness check.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import pyllm
from pyllm import reference

__all__ = ["Case", "OpBench", "CASES", "GPU_CASES", "SUITES", "BENCHES", "select"]


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark shape of one op."""

    op: str
    model: str
    label: str
    dims: tuple  # the op's sizes, named by its OpBench.dim_names
    quick: bool = False  # part of the --quick smoke run
    mode: str = "fwd"  # "fwd", or "fwd+bwd": the forward and the gradients of every input
    #: Smaller sizes for the float64 correctness check, where the timed sizes'
    #: float64 truth would not fit (GPU attention at 8k tokens); None: the same.
    check_dims: tuple | None = None
    #: Whether torch.compile of the eager baseline is timed too (off where the
    #: baseline is one library call that compile would make as well: SDPA, cuBLAS).
    compile_baseline: bool = True

    @property
    def name(self) -> str:
        suffix = "" if self.mode == "fwd" else f" ({self.mode})"
        return f"{self.op} {self.model} {self.label}{suffix}"

    def shape_text(self) -> str:
        return "x".join(str(d) for d in self.dims)


class OpBench(abc.ABC):
    """How to benchmark one op; one subclass per op."""

    op: str
    dim_names: tuple
    #: Work of forward + backward over the forward's (FLOPs, or bytes for
    #: memory-bound ops), for the rates of "fwd+bwd" cases.
    backward_factor = 3.0

    @abc.abstractmethod
    def inputs(self, case: Case, dtype, device, gen) -> tuple:
        """Fresh random inputs for ``case`` (never zeros)."""

    @abc.abstractmethod
    def pyllm(self, case: Case, backend: str | None) -> Callable:
        """A function of the inputs that runs pyllm's op on ``backend``."""

    @abc.abstractmethod
    def eager(self, case: Case) -> Callable:
        """PyTorch's own eager implementation, a function of the inputs."""

    @abc.abstractmethod
    def truth(self, case: Case, inputs: tuple) -> torch.Tensor:
        """The float64 result for ``inputs``."""

    def bytes_moved(self, case: Case, dtype) -> int:
        """The fewest bytes the op must move: each input read once, output written once."""
        return 0

    def flops(self, case: Case) -> int:
        """Floating-point operations of one call (0 for memory-bound ops)."""
        return 0


def _size(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class NormBench(OpBench):
    """rms_norm, layer_norm and their fused-residual forms (``add_``)."""

    dim_names = ("rows", "hidden")
    backward_factor = 2.5  # backward: read x and dy, write dx
    eps = 1e-6

    def __init__(self, op: str):
        self.op = op
        self.rms = "rms" in op
        self.fused = op.startswith("add_")

    def inputs(self, case, dtype, device, gen):
        rows, hidden = case.dims
        x = torch.randn(rows, hidden, generator=gen).to(device=device, dtype=dtype)
        r = torch.randn(rows, hidden, generator=gen).to(device=device, dtype=dtype)
        w = (torch.rand(hidden, generator=gen) + 0.5).to(device=device, dtype=dtype)
        b = torch.randn(hidden, generator=gen).to(device=device, dtype=dtype)
        params = (w,) if self.rms else (w, b)  # every input is used (gradients of all)
        return ((x, r) if self.fused else (x,)) + params

    def _split(self, inputs):
        """(x, residual or None, weight, bias or None)."""
        x, rest = inputs[0], list(inputs[1:])
        r = rest.pop(0) if self.fused else None
        w = rest.pop(0)
        b = rest.pop(0) if rest else None
        return x, r, w, b

    def pyllm(self, case, backend):
        fn = getattr(pyllm, self.op)
        eps = self.eps

        def run(*inputs):
            x, r, w, b = self._split(inputs)
            params = (w,) if self.rms else (w, b)
            out = fn(*((x, r) if self.fused else (x,)), *params, eps, backend=backend)
            return out[0] if self.fused else out
        return run

    def eager(self, case):
        eps = self.eps

        def run(*inputs):
            x, r, w, b = self._split(inputs)
            total = x + r if self.fused else x
            n = x.shape[-1:]
            return F.rms_norm(total, n, w, eps) if self.rms else F.layer_norm(total, n, w, b, eps)
        return run

    def truth(self, case, inputs):
        x, r, w, b = (t.double() if t is not None else None for t in self._split(inputs))
        total = x + r if self.fused else x
        if self.rms:
            return reference.rms_norm(total, w, self.eps)[0]
        return reference.layer_norm(total, w, b, self.eps)[0]

    def bytes_moved(self, case, dtype):
        rows, hidden = case.dims
        # x read, y written (+ residual read and sum written), parameters read.
        per_row = (4 if self.fused else 2) * hidden
        return (rows * per_row + (1 if self.rms else 2) * hidden) * _size(dtype)


class AttentionBench(OpBench):
    """pyllm.attention against F.scaled_dot_product_attention (k/v heads repeated
    for GQA, as a PyTorch user would)."""

    op = "attention"
    dim_names = ("batch", "seq_q", "seq_k", "heads", "heads_kv", "head_dim", "causal")
    backward_factor = 3.5  # the backward: 2.5x the forward's FLOPs, as flash-attn counts

    def inputs(self, case, dtype, device, gen):
        b, sq, sk, h, hkv, d, _ = case.dims
        q = torch.randn(b, sq, h, d, generator=gen).to(device=device, dtype=dtype)
        k = torch.randn(b, sk, hkv, d, generator=gen).to(device=device, dtype=dtype)
        v = torch.randn(b, sk, hkv, d, generator=gen).to(device=device, dtype=dtype)
        return q, k, v

    def pyllm(self, case, backend):
        causal = bool(case.dims[-1])
        return lambda q, k, v: pyllm.attention(q, k, v, causal=causal, backend=backend)

    def eager(self, case):
        causal_case = bool(case.dims[-1])

        def run(q, k, v):
            group = q.shape[2] // k.shape[2]
            k = k.repeat_interleave(group, 2) if group > 1 else k
            v = v.repeat_interleave(group, 2) if group > 1 else v
            causal = causal_case and q.shape[1] == k.shape[1]
            mask = None
            if causal_case and not causal and q.shape[1] > 1:  # bottom-right aligned, as pyllm
                i = torch.arange(q.shape[1], device=q.device)[:, None]
                j = torch.arange(k.shape[1], device=q.device)[None, :]
                mask = j <= i + (k.shape[1] - q.shape[1])
            args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            if q.is_cuda and mask is None and q.dtype != torch.float32:
                # the FlashAttention-2 kernel inside PyTorch, the peer to beat
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    out = F.scaled_dot_product_attention(*args, is_causal=causal)
            else:
                out = F.scaled_dot_product_attention(*args, attn_mask=mask, is_causal=causal)
            return out.transpose(1, 2)
        return run

    def truth(self, case, inputs):
        q, k, v = (t.double() for t in inputs)
        return reference.attention(q, k, v, causal=bool(case.dims[-1]))[0]

    def bytes_moved(self, case, dtype):
        b, sq, sk, h, hkv, d, _ = case.dims
        return (2 * b * sq * h * d + 2 * b * sk * hkv * d) * _size(dtype)

    def flops(self, case):
        b, sq, sk, h, hkv, d, causal = case.dims
        full = 4 * b * h * sq * sk * d
        return full // 2 if causal and sq == sk else full


class WindowAttentionBench(AttentionBench):
    """pyllm.attention with a causal sliding window of W keys (and a softcap)
    against the same attention given to SDPA as a dense mask (the softcap
    composed in PyTorch, which SDPA lacks): what a model without window
    support runs. The kernels skip key blocks outside the window, so their
    time grows with seq x W, the dense mask's with seq^2."""

    op = "attention_window"
    routed = "attention"
    dim_names = ("batch", "seq", "heads", "heads_kv", "head_dim", "window", "softcap")

    def inputs(self, case, dtype, device, gen):
        b, s, h, hkv, d, _, _ = case.dims
        return super().inputs(Case("attention", "", "", (b, s, s, h, hkv, d, True)), dtype, device,
                              gen)

    def _kw(self, case):
        window, softcap = case.dims[5], case.dims[6]
        return dict(causal=True, window_size=(window - 1, 0), softcap=float(softcap))

    def pyllm(self, case, backend):
        kw = self._kw(case)
        return lambda q, k, v: pyllm.attention(q, k, v, backend=backend, **kw)

    def eager(self, case):
        window, softcap = case.dims[5], case.dims[6]

        def run(q, k, v):
            group = q.shape[2] // k.shape[2]
            k = k.repeat_interleave(group, 2) if group > 1 else k
            v = v.repeat_interleave(group, 2) if group > 1 else v
            s = q.shape[1]
            i = torch.arange(s, device=q.device)[:, None]
            j = torch.arange(s, device=q.device)[None, :]
            band = (j <= i) & (j > i - window)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if not softcap:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=band).transpose(1, 2)
            scores = softcap * torch.tanh((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 / softcap)
            p = torch.softmax(scores.masked_fill(~band, float("-inf")), dim=-1)
            return (p @ v).transpose(1, 2)
        return run

    def truth(self, case, inputs):
        q, k, v = (t.double() for t in inputs)
        return reference.attention(q, k, v, **self._kw(case))[0]

    def bytes_moved(self, case, dtype):
        b, s, h, hkv, d, _, _ = case.dims
        return (2 * b * s * h * d + 2 * b * s * hkv * d) * _size(dtype)

    def flops(self, case):
        b, s, h, hkv, d, window, _ = case.dims
        return 4 * b * h * d * sum(min(i + 1, window) for i in range(s))


def _alibi_slopes(heads, device):
    """BLOOM's slopes: 2^(-8 i / heads), i = 1 .. heads."""
    return torch.exp2(-8.0 * torch.arange(1, heads + 1, device=device) / heads)


class VariantAttentionBench(AttentionBench):
    """Causal pyllm.attention plain, with a softcap (50), ALiBi (BLOOM's
    slopes) or sinks (gpt-oss's): each variant's cost against plain
    attention's is the comparison that counts (pyllm rows of one run);
    PyTorch runs SDPA (plain; ALiBi as a dense float bias, as BLOOM-style code
    gives it) or its composition (softcap, sinks: SDPA has neither)."""

    op = "attention_variant"
    routed = "attention"
    dim_names = ("batch", "seq", "heads", "heads_kv", "head_dim", "variant")

    def inputs(self, case, dtype, device, gen):
        b, s, h, hkv, d, _ = case.dims
        return super().inputs(Case("attention", "", "", (b, s, s, h, hkv, d, True)), dtype, device,
                              gen)

    @staticmethod
    def _kw(case, device):
        variant, heads = case.dims[5], case.dims[2]
        if variant == "softcap":
            return dict(softcap=50.0)
        if variant == "alibi":
            return dict(alibi_slopes=_alibi_slopes(heads, device))
        if variant == "sinks":
            return dict(sinks=torch.linspace(-1.0, 1.0, heads, device=device))
        return {}

    def pyllm(self, case, backend):
        def run(q, k, v):
            return pyllm.attention(q, k, v, causal=True, backend=backend,
                                   **self._kw(case, q.device))
        return run

    def eager(self, case):
        variant = case.dims[5]

        def run(q, k, v):
            group = q.shape[2] // k.shape[2]
            k = k.repeat_interleave(group, 2) if group > 1 else k
            v = v.repeat_interleave(group, 2) if group > 1 else v
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            s = q.shape[2]
            i = torch.arange(s, device=q.device)[:, None]
            j = torch.arange(s, device=q.device)[None, :]
            if variant == "none":
                return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
            if variant == "alibi":
                slopes = _alibi_slopes(q.shape[1], q.device)[:, None, None]
                bias = (-slopes * (i - j).abs()).masked_fill(j > i, float("-inf")).to(q.dtype)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2)
            scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            if variant == "softcap":
                scores = 50.0 * torch.tanh(scores / 50.0)
            scores = scores.masked_fill(j > i, float("-inf"))
            if variant == "sinks":
                sinks = self._kw(case, q.device)["sinks"].to(q.dtype)
                column = sinks.view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
                p = torch.softmax(torch.cat([scores, column], -1), dim=-1)[..., :-1]
            else:
                p = torch.softmax(scores, dim=-1)
            return (p @ v).transpose(1, 2)
        return run

    def truth(self, case, inputs):
        q, k, v = (t.double() for t in inputs)
        kw = {name: t.double() if isinstance(t, torch.Tensor) else t
              for name, t in self._kw(case, q.device).items()}
        return reference.attention(q, k, v, causal=True, **kw)[0]

    def bytes_moved(self, case, dtype):
        b, s, h, hkv, d, _ = case.dims
        return (2 * b * s * h * d + 2 * b * s * hkv * d) * _size(dtype)

    def flops(self, case):
        b, s, h, hkv, d, _ = case.dims
        return 2 * b * h * s * s * d


class PagedDecodeBench(OpBench):
    """Decode (one query per sequence, causal) over a KV cache of seq_k tokens
    per sequence: page_size 0 is pyllm.attention over the contiguous cache,
    page_size > 0 pyllm.attention_paged over the same keys in pages of that
    size in a shuffled order (a block table per sequence). The paged rows
    against the contiguous row of one run are the comparison that counts;
    PyTorch has no paged attention: its baseline gathers each sequence's
    pages (what a PyTorch user must do) and runs SDPA."""

    op = "attention_paged"
    routed = "attention"
    dim_names = ("batch", "seq_k", "heads", "heads_kv", "head_dim", "page_size")

    def inputs(self, case, dtype, device, gen):
        b, sk, h, hkv, d, page = case.dims
        q = torch.randn(b, 1, h, d, generator=gen).to(device=device, dtype=dtype)
        k = torch.randn(b, sk, hkv, d, generator=gen).to(device=device, dtype=dtype)
        v = torch.randn(b, sk, hkv, d, generator=gen).to(device=device, dtype=dtype)
        if not page:
            return q, k, v
        per = -(-sk // page)
        order = torch.randperm(b * per, generator=gen).to(device)
        table = order.view(b, per).to(torch.int32)
        pad = per * page - sk
        k_pages = torch.empty(b * per, page, hkv, d, dtype=dtype, device=device)
        v_pages = torch.empty_like(k_pages)
        k_pages[order] = F.pad(k, (0, 0, 0, 0, 0, pad)).view(b * per, page, hkv, d)
        v_pages[order] = F.pad(v, (0, 0, 0, 0, 0, pad)).view(b * per, page, hkv, d)
        seqlens = torch.full((b,), sk, dtype=torch.int32, device=device)
        return q, k_pages, v_pages, table, seqlens

    def pyllm(self, case, backend):
        sk = case.dims[1]
        if not case.dims[5]:
            return lambda q, k, v: pyllm.attention(q, k, v, causal=True, backend=backend)

        def run(q, k_pages, v_pages, table, seqlens):
            return pyllm.attention_paged(q, k_pages, v_pages, table, seqlens, causal=True,
                                         max_seqlen_k=sk, backend=backend)
        return run

    @staticmethod
    def _contiguous(case, inputs):
        """(q, k, v) with the pages gathered back into (batch, seq_k, heads_kv, head_dim)."""
        if not case.dims[5]:
            return inputs
        q, k_pages, v_pages, table, _ = inputs
        b, sk = case.dims[:2]
        gather = lambda p: p[table.long()].flatten(1, 2)[:, :sk]  # noqa: E731
        return q, gather(k_pages), gather(v_pages)

    def eager(self, case):
        sdpa = AttentionBench().eager(Case("attention", "", "", (1, 1, 2, 1, 1, 1, True)))
        return lambda *inputs: sdpa(*self._contiguous(case, inputs))

    def truth(self, case, inputs):
        q, k, v = (t.double() for t in self._contiguous(case, inputs))
        return reference.attention(q, k, v, causal=True)[0]

    def bytes_moved(self, case, dtype):
        b, sk, h, hkv, d, _ = case.dims
        return (2 * b * h * d + 2 * b * sk * hkv * d) * _size(dtype)

    def flops(self, case):
        b, sk, h, hkv, d, _ = case.dims
        return 4 * b * h * sk * d


class LinearBench(OpBench):
    """pyllm.linear / swiglu against F.linear followed by the activation."""

    dim_names = ("rows", "in_features", "out_features", "activation")

    def __init__(self, op: str):
        self.op = op
        self.swiglu = op.startswith("swiglu")

    def inputs(self, case, dtype, device, gen):
        m, k, n, _ = case.dims
        x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
        w = (torch.randn(n, k, generator=gen) * k ** -0.5).to(device=device, dtype=dtype)
        if self.swiglu:
            w2 = (torch.randn(n, k, generator=gen) * k ** -0.5).to(device=device, dtype=dtype)
            return x, w, w2
        b = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
        return x, w, b

    def pyllm(self, case, backend):
        if self.swiglu:
            return lambda x, wg, wu: pyllm.swiglu(x, wg, wu, backend=backend)
        act = case.dims[3]
        return lambda x, w, b: pyllm.linear(x, w, b, act, backend=backend)

    def eager(self, case):
        if self.swiglu:
            return lambda x, wg, wu: F.silu(F.linear(x, wg)) * F.linear(x, wu)
        act = reference.ACTIVATIONS[case.dims[3]]
        return lambda x, w, b: act(F.linear(x, w, b))

    def truth(self, case, inputs):
        if self.swiglu:
            return reference.swiglu(*(t.double() for t in inputs))
        x, w, b = (t.double() for t in inputs)
        return reference.linear(x, w, b, case.dims[3])

    def bytes_moved(self, case, dtype):
        m, k, n, _ = case.dims
        weights = (2 if self.swiglu else 1) * n * k
        return (m * k + weights + m * n) * _size(dtype)

    def flops(self, case):
        m, k, n, _ = case.dims
        return (2 if self.swiglu else 1) * 2 * m * n * k


class PackedLinearBench(LinearBench):
    """pyllm.linear_packed / swiglu_packed (weights packed once by
    pyllm.pack_weight, outside the timing: inference, as Linear.pack()
    serves it) against F.linear followed by the activation. CPU only."""

    routed = "linear"

    def pyllm(self, case, backend):
        if backend != "cpu":
            raise ValueError(f"pyllm.{self.op}: packed weights are for the cpu backend only")
        packs = {}

        def packed(w):
            key = (w.data_ptr(), w._version)
            if key not in packs:
                packs[key] = pyllm.pack_weight(w)
            return packs[key]
        if self.swiglu:
            return lambda x, wg, wu: pyllm.swiglu_packed(x, packed(wg), packed(wu))
        act = case.dims[3]
        return lambda x, w, b: pyllm.linear_packed(x, packed(w), b, act)


class RotaryBench(OpBench):
    """pyllm.rotary of q and k (new outputs, as transformers' apply_rotary_pos_emb
    returns: ``inplace=False``) against transformers' composition in the input
    dtype (cos/sin gathered by position and cast, rotate_half). Only q's result
    is compared; both are computed by both."""

    op = "rotary"
    dim_names = ("batch", "seq", "heads", "heads_kv", "head_dim")
    max_positions = 8192

    def inputs(self, case, dtype, device, gen):
        b, s, h, hkv, d = case.dims
        q = torch.randn(b, s, h, d, generator=gen).to(device=device, dtype=dtype)
        k = torch.randn(b, s, hkv, d, generator=gen).to(device=device, dtype=dtype)
        cos, sin = (t.to(device) for t in pyllm.rotary_tables(d, self.max_positions, 500000.0))
        positions = torch.randint(0, self.max_positions, (b, s), generator=gen).to(device)
        return q, k, cos, sin, positions

    def pyllm(self, case, backend):
        def run(q, k, cos, sin, positions):
            return pyllm.rotary(q, k, cos, sin, positions, inplace=False, backend=backend)[0]
        return run

    def eager(self, case):
        def run(q, k, cos, sin, positions):
            c, s = cos[positions].unsqueeze(2), sin[positions].unsqueeze(2)
            c, s = torch.cat([c, c], -1).to(q.dtype), torch.cat([s, s], -1).to(q.dtype)

            def rotate_half(x):
                half = x.shape[-1] // 2
                return torch.cat([-x[..., half:], x[..., :half]], -1)
            out_q = q * c + rotate_half(q) * s
            out_k = k * c + rotate_half(k) * s  # noqa: F841 (computed, as pyllm's)
            return out_q
        return run

    def truth(self, case, inputs):
        q, _, cos, sin, positions = inputs
        return reference.rotary(q.double(), cos.double(), sin.double(), positions)

    def bytes_moved(self, case, dtype):
        b, s, h, hkv, d = case.dims
        # q and k read and written once, a cos and a sin row per token (float32)
        return b * s * (2 * (h + hkv) * d * _size(dtype) + d * 4)


class CrossEntropyBench(OpBench):
    """pyllm.cross_entropy on logits, or pyllm.linear_cross_entropy on the LM
    head's input and weight, against F.cross_entropy (after F.linear): the
    unfused composition a training step runs. Mean over the rows, 1 in 8
    ignored."""

    dim_names = ("rows", "hidden", "vocab")
    routed = "cross_entropy"
    backward_factor = 3.0

    def __init__(self, op: str):
        self.op = op
        self.fused = op == "linear_cross_entropy"

    def inputs(self, case, dtype, device, gen):
        rows, hidden, vocab = case.dims
        target = torch.randint(0, vocab, (rows,), generator=gen)
        target[::8] = -100
        target = target.to(device)
        if not self.fused:
            return (torch.randn(rows, vocab, generator=gen) * 2).to(device=device, dtype=dtype), \
                target
        h = torch.randn(rows, hidden, generator=gen).to(device=device, dtype=dtype)
        w = (torch.randn(vocab, hidden, generator=gen) * hidden ** -0.5 * 2).to(device=device,
                                                                               dtype=dtype)
        return h, w, target

    def pyllm(self, case, backend):
        if self.fused:
            return lambda h, w, t: pyllm.linear_cross_entropy(h, w, t, backend=backend)
        return lambda x, t: pyllm.cross_entropy(x, t, backend=backend)

    def eager(self, case):
        if self.fused:
            return lambda h, w, t: F.cross_entropy(F.linear(h, w), t)
        return lambda x, t: F.cross_entropy(x, t)

    def truth(self, case, inputs):
        if self.fused:
            h, w, t = inputs  # (the runner hands every input over in float64)
            return F.cross_entropy(F.linear(h.double(), w.double()), t.long())
        x, t = inputs
        return F.cross_entropy(x.double(), t.long())

    def bytes_moved(self, case, dtype):
        rows, hidden, vocab = case.dims
        return 0 if self.fused else 2 * rows * vocab * _size(dtype)

    def flops(self, case):
        rows, hidden, vocab = case.dims
        return 2 * rows * hidden * vocab if self.fused else 0


NORM_OPS = ("rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm")
BENCHES = {op: NormBench(op) for op in NORM_OPS}
BENCHES["cross_entropy"] = CrossEntropyBench("cross_entropy")
BENCHES["linear_cross_entropy"] = CrossEntropyBench("linear_cross_entropy")
BENCHES["rotary"] = RotaryBench()
BENCHES["attention_paged"] = PagedDecodeBench()
BENCHES["attention"] = AttentionBench()
BENCHES["attention_window"] = WindowAttentionBench()
BENCHES["attention_variant"] = VariantAttentionBench()
BENCHES["linear"] = LinearBench("linear")
BENCHES["swiglu"] = LinearBench("swiglu")
BENCHES["linear_packed"] = PackedLinearBench("linear_packed")
BENCHES["swiglu_packed"] = PackedLinearBench("swiglu_packed")

_NORM_SHAPES = [
    ("bert-base", "8x128 tokens", (1024, 768), True),
    ("gpt2", "prefill 512", (512, 768), False),
    ("llama-1b", "prefill 2048", (2048, 2048), False),
    ("llama-1b", "decode 1", (1, 2048), True),
    ("large", "4096 rows", (4096, 4096), False),
    ("large", "decode 1", (1, 4096), False),
]

CASES = [Case(op, model, label, dims, quick=quick and op == "rms_norm")
         for op in NORM_OPS for model, label, dims, quick in _NORM_SHAPES]

# (batch, seq_q, seq_k, heads, heads_kv, head_dim, causal)
CASES += [
    Case("attention", "bert-base", "8x128", (8, 128, 128, 12, 12, 64, False), quick=True),
    Case("attention", "gpt2", "prefill 512", (1, 512, 512, 12, 12, 64, True)),
    Case("attention", "gpt2", "prefill 1024", (1, 1024, 1024, 12, 12, 64, True)),
    Case("attention", "gpt2", "4x512", (4, 512, 512, 12, 12, 64, True)),
    Case("attention", "gpt2", "2048 full", (1, 2048, 2048, 12, 12, 64, False)),
    Case("attention", "llama-1b", "prefill 1024", (1, 1024, 1024, 32, 8, 64, True)),
    Case("attention", "gpt2", "decode 2048", (1, 1, 2048, 12, 12, 64, True), quick=True),
    # (the float64 check of S = 16k, 8 x 16k x 16k scores, would not fit: S = 2k)
    *(Case("attention_window", "mistral-like", f"W512 S{s // 1024}k", (1, s, 8, 2, 64, 512, 0),
           compile_baseline=False,
           check_dims=(1, 2048, 8, 2, 64, 512, 0) if s > 8192 else None)
      for s in (2048, 4096, 8192, 16384)),
    *(Case("attention_variant", "llama-1b-like", f"causal 2048 {variant}",
           (1, 2048, 16, 4, 64, variant), compile_baseline=False)
      for variant in ("none", "softcap", "alibi", "sinks")),
    Case("attention_window", "gemma2-like", "W512 S4k softcap 50", (1, 4096, 8, 4, 64, 512, 50),
         compile_baseline=False),
    Case("attention", "gpt2", "decode 8192", (1, 1, 8192, 12, 12, 64, True)),
    Case("attention", "llama-1b", "decode 4096", (1, 1, 4096, 32, 8, 64, True)),
    # (batch, seq_k, heads, heads_kv, head_dim, page_size): the contiguous cache
    # (page 0) against pages of 16 and 256 tokens
    *(Case("attention_paged", "llama-1b", f"decode {kv // 1024}k "
           + (f"page {page}" if page else "contiguous"), (4, kv, 32, 8, 64, page),
           compile_baseline=False)
      for kv in (4096, 32768) for page in (0, 16, 256)),
]

# (rows, in_features, out_features, activation)
CASES += [
    Case("linear", "gpt2", "qkv 512", (512, 768, 2304, "none")),
    Case("linear", "gpt2", "mlp up 512", (512, 768, 3072, "gelu_tanh"), quick=True),
    Case("linear", "gpt2", "mlp down 512", (512, 3072, 768, "none")),
    Case("linear", "large", "decode 1", (1, 4096, 4096, "none"), quick=True),
    Case("linear", "large", "decode 8", (8, 4096, 4096, "none")),
    Case("linear", "large", "decode 16", (16, 4096, 4096, "silu")),
    Case("swiglu", "llama-1b", "mlp 256", (256, 2048, 8192, "silu")),
    Case("swiglu", "llama-1b", "decode 1", (1, 2048, 8192, "silu")),
    # TinyLlama-1.1B's MLP at a 128-token prefill, and the same calls with
    # weights packed once (pyllm.nn.Linear.pack()): decode and prefill shapes
    Case("swiglu", "llama-1.1b", "prefill 128", (128, 2048, 5632, "silu")),
    Case("linear", "llama-1.1b", "down 128", (128, 5632, 2048, "none")),
    *(Case("linear_packed", model, label, dims) for model, label, dims in [
        ("large", "decode 1", (1, 4096, 4096, "none")),
        ("large", "decode 8", (8, 4096, 4096, "none")),
        ("large", "decode 16", (16, 4096, 4096, "silu")),
        ("llama-1.1b", "down 128", (128, 5632, 2048, "none"))]),
    Case("swiglu_packed", "llama-1b", "decode 1", (1, 2048, 8192, "silu")),
    Case("swiglu_packed", "llama-1.1b", "prefill 128", (128, 2048, 5632, "silu")),
    Case("rotary", "llama-1b", "prefill 2048", (1, 2048, 32, 4, 64), quick=True),
    Case("rotary", "llama-8b", "prefill 1024", (1, 1024, 32, 8, 128)),
    Case("rotary", "llama-8b", "decode 8", (8, 1, 32, 8, 128)),
]

# Training: forward and backward (gradients of every input).
CASES += [
    Case("rms_norm", "gpt2", "prefill 512", (512, 768), mode="fwd+bwd"),
    Case("rms_norm", "large", "4096 rows", (4096, 4096), mode="fwd+bwd"),
    Case("layer_norm", "bert-base", "8x128 tokens", (1024, 768), mode="fwd+bwd"),
    Case("attention", "gpt2", "prefill 512", (1, 512, 512, 12, 12, 64, True), mode="fwd+bwd",
         quick=True),
    Case("attention", "bert-base", "8x128", (8, 128, 128, 12, 12, 64, False), mode="fwd+bwd"),
    Case("linear", "gpt2", "mlp up 512", (512, 768, 3072, "gelu_tanh"), mode="fwd+bwd"),
    Case("linear", "gpt2", "mlp down 512", (512, 3072, 768, "none"), mode="fwd+bwd"),
    Case("swiglu", "llama-1b", "mlp 256", (256, 2048, 2048, "silu"), mode="fwd+bwd"),
    Case("cross_entropy", "llama-3", "256 tokens", (256, 0, 128256), mode="fwd+bwd",
         quick=True, check_dims=(32, 0, 128256)),
    Case("linear_cross_entropy", "llama-1b", "512 tokens", (512, 2048, 32000),
         mode="fwd+bwd", quick=True, check_dims=(64, 2048, 32000), compile_baseline=False),
    Case("linear_cross_entropy", "llama-3-1b", "512 tokens", (512, 2048, 128256),
         mode="fwd+bwd", check_dims=(32, 2048, 128256), compile_baseline=False),
]


# The GPU acceptance suite (``pyllm bench --suite gpu``), bfloat16 on a large
# GPU. Attention at FlashAttention's benchmark shapes: hidden 2048 as 32 heads
# of 64 or 16 heads of 128, batch x seq = 16k tokens, causal and not, forward
# and forward+backward (checked against float64 at 1 x 512 tokens, with the
# same heads); decode over a 4k-32k KV cache; the norms at 4096 x 8192; GEMMs
# at 4096^3 and Llama-3-8B's projections over 4096 tokens.
_GPU_SEQS = (512, 2048, 8192)
GPU_CASES = [
    Case("attention", f"fa-d{d}", f"{16384 // s}x{s}{' causal' if causal else ''}",
         (16384 // s, s, s, 2048 // d, 2048 // d, d, causal), mode=mode,
         check_dims=(1, 512, 512, 2048 // d, 2048 // d, d, causal), compile_baseline=False)
    for mode in ("fwd", "fwd+bwd") for d in (64, 128) for causal in (False, True)
    for s in _GPU_SEQS
]
GPU_CASES += [
    Case("attention", "llama-8b", f"decode {kv // 1024}k", (8, 1, kv, 32, 8, 128, True),
         check_dims=(1, 1, 1024, 32, 8, 128, True), compile_baseline=False)
    for kv in (4096, 16384, 32768)
]
GPU_CASES += [
    Case("attention_paged", "llama-8b", f"decode {kv // 1024}k "
         + (f"page {page}" if page else "contiguous"), (8, kv, 32, 8, 128, page),
         check_dims=(1, 1024, 32, 8, 128, page), compile_baseline=False)
    for kv in (4096, 32768) for page in (0, 16, 256)
]
GPU_CASES += [Case(op, "large", "4096x8192", (4096, 8192)) for op in NORM_OPS]
GPU_CASES += [Case("rms_norm", "large", "4096x8192", (4096, 8192), mode="fwd+bwd")]
GPU_CASES += [
    Case("linear", "square", "4096^3", (4096, 4096, 4096, "none"), compile_baseline=False),
    Case("linear", "llama-8b", "qkv 4096", (4096, 4096, 6144, "none"), compile_baseline=False),
    Case("linear", "llama-8b", "down 4096", (4096, 14336, 4096, "none"),
         compile_baseline=False),
    Case("swiglu", "llama-8b", "mlp 4096", (4096, 4096, 14336, "silu"), compile_baseline=False),
    Case("linear", "square", "4096^3", (4096, 4096, 4096, "none"), mode="fwd+bwd",
         compile_baseline=False),
]

#: The case lists ``pyllm bench --suite`` chooses from.
SUITES = {"default": CASES, "gpu": GPU_CASES}


def select(ops=None, quick=False, suite="default") -> list[Case]:
    """The cases of ``suite`` for ``ops`` (all when None); only the quick ones
    when ``quick`` (the first of each op for a suite that marks none)."""
    cases = [c for c in SUITES[suite] if ops is None or c.op in ops]
    if quick and not any(c.quick for c in cases):
        firsts = {}
        for c in cases:
            firsts.setdefault((c.op, c.mode), c)
        return list(firsts.values())
    return [c for c in cases if c.quick or not quick]
