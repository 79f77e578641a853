"""pyllm.cross_entropy and pyllm.linear_cross_entropy against the float64
reference under the harness rule, forward and backward (every reduction, the
gradient of "none" included), on the CPU kernel, the reference backend and
the CUDA kernel run on the host ("cuda-host": csrc/cuda/cross_entropy_kernel.cu
through tests/cuda_host/, every buffer guarded); the Triton kernel runs these
tests in the interpreter (tests/interpreter/test_triton_cross_entropy.py).
Also transformers' own causal-LM loss, NaN like PyTorch, bad input."""

import ctypes

import pytest
import torch
import torch.nn.functional as F

import pyllm
from cuda_host_kernels import DTYPE_CODE, Guarded, check_launch, library
from harness import (ISAS, KERNEL_DTYPES, check_compiles_fullgraph, check_rule, generator,
                     noncontiguous, poisoned_outputs, randn, run_under_isa)
from pyllm import reference

CPU_BACKENDS = ("cpu", "reference", "cuda-host")
# (rows, vocab): one class, a vocab under one SIMD vector, odd, past one Triton block
SHAPES = [(3, 1), (9, 7), (33, 1000), (5, 4099)]
OPTIONS = {
    "plain": {},
    "smooth": {"label_smoothing": 0.1},
    "zloss": {"z_loss": 1e-3},
    "softcap": {"softcap": 5.0},
    "all": {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 3.0},
}


def host_cross_entropy(logits, target, ignore_index, label_smoothing, z_loss, softcap, want_grad):
    """The CUDA kernel on the host, as csrc/cuda/cross_entropy.cpp launches it."""
    rows, vocab = logits.shape
    gx, gt = Guarded(logits, fill=logits), Guarded(target, fill=target)
    loss, lse = Guarded(torch.empty(rows)), Guarded(torch.empty(rows))
    grad = Guarded(torch.empty(rows, vocab, dtype=logits.dtype)) if want_grad else None
    sizes = (ctypes.c_int64 * 4)(rows, vocab, vocab, ignore_index)
    check_launch(library().host_cross_entropy(
        gx.ptr, ctypes.c_void_p(gt.tensor.data_ptr()), loss.ptr, lse.ptr,
        grad.ptr if grad is not None else ctypes.c_void_p(0), sizes,
        ctypes.c_float(label_smoothing), ctypes.c_float(z_loss), ctypes.c_float(softcap),
        DTYPE_CODE[logits.dtype]), "cross_entropy")
    for name, g in (("logits", gx), ("target", gt), ("loss", loss), ("lse", lse), ("grad", grad)):
        if g is not None:
            g.check(name)
    return (loss.tensor.clone(), lse.tensor.clone(),
            grad.tensor.clone() if grad is not None else logits.new_empty(0))


def with_backend(backend, fn):
    """Runs fn() with pyllm's cross_entropy routed to ``backend`` ("cuda-host":
    host_cross_entropy)."""
    if backend != "cuda-host":
        return fn(backend)
    from pyllm.ops import cross_entropy as face

    route = face._backend.route
    face._backend.route = lambda op, t, b: host_cross_entropy
    try:
        return fn(None)
    finally:
        face._backend.route = route


def pytorch_loss(logits, target, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                 z_loss=0.0, softcap=None):
    """PyTorch's composition in the logits' dtype."""
    z = softcap * torch.tanh(logits / softcap) if softcap else logits
    loss = F.cross_entropy(z, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction="none")
    if z_loss:
        keep = target != ignore_index
        loss = loss + torch.where(keep, z_loss * torch.logsumexp(z, -1) ** 2, 0)
    return _reduce(loss, target, ignore_index, reduction)


def truth_loss(logits, target, ignore_index=-100, label_smoothing=0.0, reduction="mean",
               z_loss=0.0, softcap=None):
    loss, _ = reference.cross_entropy_rows(logits.double(), target, ignore_index=ignore_index,
                                           label_smoothing=label_smoothing, z_loss=z_loss,
                                           softcap=softcap)
    return _reduce(loss, target, ignore_index, reduction)


def _reduce(loss, target, ignore_index, reduction):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum()


def make(shape, dtype, key, ignored=True):
    rows, vocab = shape
    gen = generator("cross entropy", shape, dtype, key)
    logits = randn(shape, dtype, gen=gen, scale=3.0)
    target = torch.randint(0, vocab, (rows,), generator=gen)
    if ignored and rows > 2:
        target[1] = -100
    return logits, target, gen


def grads(fn, logits, grad_out):
    leaf = logits.detach().clone().requires_grad_()
    out = fn(leaf)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), leaf.grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", list(OPTIONS), ids=str)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cross_entropy(shape, dtype, options, reduction, backend):
    logits, target, gen = make(shape, dtype, options)
    kw = dict(OPTIONS[options], reduction=reduction)
    grad_out = randn((shape[0],) if reduction == "none" else (), torch.float32, gen=gen)
    with poisoned_outputs():
        ours, g_ours = with_backend(backend, lambda b: grads(
            lambda x: pyllm.cross_entropy(x, target, backend=b, **kw), logits, grad_out))
    truth, g_truth = grads(lambda x: truth_loss(x, target, **kw), logits.double(),
                           grad_out.double())
    theirs, g_theirs = grads(lambda x: pytorch_loss(x, target, **kw), logits, grad_out)
    check_rule(ours.float(), truth, theirs.float(), what="loss")
    check_rule(g_ours, g_truth, g_theirs, factor=3, what="grad logits")


LINEAR_SHAPES = [(1, 8, 5), (37, 64, 1000), (50, 40, 4099)]  # rows, hidden, vocab


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
def test_linear_cross_entropy(shape, dtype, bias, reduction, backend):
    """Against F.linear + the loss, several chunks (chunk_size 16), the
    gradients of hidden, weight and bias for every reduction."""
    rows, hidden, vocab = shape
    gen = generator("flce", shape, dtype, bias, reduction)
    h = randn((rows, hidden), dtype, gen=gen)
    w = randn((vocab, hidden), dtype, gen=gen, scale=hidden ** -0.5 * 3)
    b = randn((vocab,), dtype, gen=gen) if bias else None
    target = torch.randint(0, vocab, (rows,), generator=gen)
    if rows > 2:
        target[2] = -100
    grad_out = randn((rows,) if reduction == "none" else (), torch.float32, gen=gen)
    kw = dict(reduction=reduction, label_smoothing=0.05, z_loss=1e-4)
    inputs = [t for t in (h, w, b) if t is not None]

    def run(fn, tensors, g):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*leaves)
        out.backward(g.to(out.dtype))
        return [out.detach()] + [t.grad for t in leaves]

    def composed(loss_fn):
        return lambda h, w, *b: loss_fn(F.linear(h, w, b[0] if b else None), target, **kw)

    ours = with_backend(backend, lambda be: run(
        lambda h, w, *b: pyllm.linear_cross_entropy(h, w, target, b[0] if b else None,
                                                    chunk_size=16, backend=be, **kw),
        inputs, grad_out))
    exact = run(composed(truth_loss), [t.double() for t in inputs], grad_out.double())
    theirs = run(composed(pytorch_loss), inputs, grad_out)
    check_rule(ours[0].float(), exact[0], theirs[0].float(), what="loss")
    for name, o, e, p in zip(("hidden", "weight", "bias"), ours[1:], exact[1:], theirs[1:]):
        assert o.dtype == dtype
        check_rule(o, e, p, factor=3, what=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_linear_cross_entropy_many_chunks(dtype):
    """63 chunks: grad_weight, accumulated in its own dtype and rounded once
    per chunk, still meets the rule."""
    rows, hidden, vocab = 1000, 48, 300
    gen = generator("flce chunks", dtype)
    h = randn((rows, hidden), dtype, gen=gen)
    w = randn((vocab, hidden), dtype, gen=gen, scale=hidden ** -0.5 * 3)
    target = torch.randint(0, vocab, (rows,), generator=gen)
    target[::9] = -100

    def run(loss_fn, tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = loss_fn(*leaves)
        out.backward()
        return [out.detach()] + [t.grad for t in leaves]

    ours = run(lambda a, b: pyllm.linear_cross_entropy(a, b, target, chunk_size=16), [h, w])
    exact = run(lambda a, b: F.cross_entropy(F.linear(a, b), target), [h.double(), w.double()])
    theirs = run(lambda a, b: F.cross_entropy(F.linear(a, b), target), [h, w])
    check_rule(ours[0].float(), exact[0], theirs[0].float(), what="loss")
    for name, o, e, p in zip(("hidden", "weight"), ours[1:], exact[1:], theirs[1:]):
        check_rule(o, e, p, factor=3, what=f"grad {name}")


@pytest.mark.parametrize("fused", [False, True], ids=["cross_entropy", "linear_cross_entropy"])
def test_every_row_ignored_like_pytorch(fused):
    """Mean over no rows: the loss is NaN and the gradients are 0, as PyTorch's."""
    gen = generator("all ignored", fused)
    h, w = randn((5, 8), gen=gen), randn((11, 8), gen=gen)
    target = torch.full((5,), -100)

    def run(loss_fn):
        leaves = [t.detach().clone().requires_grad_() for t in (h, w)]
        out = loss_fn(*leaves)
        out.backward()
        return [out.detach()] + [t.grad for t in leaves]

    ours = run(lambda a, b: pyllm.linear_cross_entropy(a, b, target) if fused
               else pyllm.cross_entropy(F.linear(a, b), target))
    theirs = run(lambda a, b: F.cross_entropy(F.linear(a, b), target))
    assert ours[0].isnan() and theirs[0].isnan()
    for o, t in zip(ours[1:], theirs[1:]):
        assert torch.equal(o, t) and not o.isnan().any()


def test_linear_cross_entropy_hands_its_gradients_over_once():
    """The gradients computed in the forward are scaled in place and handed
    over (no copy of grad_weight); a second backward raises, naming why."""
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    loss = pyllm.linear_cross_entropy(h, w, torch.arange(6))
    loss.backward(retain_graph=True)
    first = w.grad.clone()
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
    torch.testing.assert_close(w.grad, first)


def test_noncontiguous_and_3d_logits():
    logits, target, _ = make((12, 50), torch.float32, "layout")
    strided = noncontiguous(logits)
    expect = F.cross_entropy(logits.double(), target).float()
    torch.testing.assert_close(pyllm.cross_entropy(strided, target), expect)
    torch.testing.assert_close(pyllm.cross_entropy(logits.view(3, 4, 50), target.view(3, 4)),
                               expect)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_like_pytorch(backend):
    """A NaN or +inf logit gives that row a NaN loss and NaN gradients, as
    PyTorch's composition; -inf logits are fine; ignored rows stay 0."""
    logits, target, _ = make((4, 30), torch.float32, "nan", ignored=False)
    logits[0, 3] = float("nan")
    logits[1, 5] = float("inf")
    logits[2, 7] = float("-inf")
    target[3] = -100
    ours, g = with_backend(backend, lambda b: grads(
        lambda x: pyllm.cross_entropy(x, target, reduction="none", backend=b), logits,
        torch.ones(4)))
    theirs, g_theirs = grads(lambda x: F.cross_entropy(x, target, reduction="none"), logits,
                             torch.ones(4))
    assert torch.equal(ours.isnan(), theirs.isnan()), (ours, theirs)
    assert torch.equal(g.isnan(), g_theirs.isnan())
    assert ours[3] == 0 and (g[3] == 0).all()


def test_bad_input():
    logits = torch.randn(4, 10)
    target = torch.tensor([1, 2, 3, 4])
    with pytest.raises(ValueError, match="target must be in"):
        pyllm.cross_entropy(logits, torch.tensor([1, 2, 10, 0]))
    with pytest.raises(TypeError, match="target must be"):
        pyllm.cross_entropy(logits, target.float())
    with pytest.raises(ValueError, match="one entry per row"):
        pyllm.cross_entropy(logits, target[:3])
    with pytest.raises(ValueError, match="without the last"):  # F.cross_entropy's (N, C, d)
        pyllm.cross_entropy(torch.randn(2, 10, 3), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction must be one of"):
        pyllm.cross_entropy(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        pyllm.cross_entropy(logits, target, label_smoothing=1.5)
    with pytest.raises(ValueError, match="softcap must be positive"):
        pyllm.cross_entropy(logits, target, softcap=0.0)
    with pytest.raises(ValueError, match="weight must be"):
        pyllm.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 9), target)
    with pytest.raises(TypeError, match="hidden's dtype"):
        pyllm.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8).double(), target)


def test_host_kernel_takes_a_bad_target_as_nan():
    logits, _, _ = make((3, 20), torch.float32, "bad target")
    loss, lse, grad = host_cross_entropy(logits, torch.tensor([0, 20, -5]), -100, 0.0, 0.0, 0.0,
                                         True)
    assert not loss[0].isnan() and loss[1:].isnan().all() and grad[1:].isnan().all()


def test_against_transformers_causal_lm_loss():
    """pyllm.models.causal_lm_loss (now on pyllm.cross_entropy) and the fused
    head equal transformers' ForCausalLMLoss."""
    loss_utils = pytest.importorskip("transformers.loss.loss_utils")
    from pyllm.models.losses import causal_lm_loss, causal_lm_loss_fused

    gen = generator("hf causal loss")
    hidden = randn((2, 9, 16), gen=gen)
    weight = randn((50, 16), gen=gen)
    ids = torch.randint(0, 50, (2, 9), generator=gen)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    logits = F.linear(hidden, weight)
    want = loss_utils.ForCausalLMLoss(logits, labels, 50)
    torch.testing.assert_close(causal_lm_loss(logits, ids, mask), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(causal_lm_loss_fused(hidden, weight, ids, mask), want,
                               rtol=1e-5, atol=1e-6)


class _Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 40, bias=False)

    def forward(self, x):
        target = torch.arange(x.shape[0]) % 40
        h = self.proj(x)
        return pyllm.cross_entropy(self.head(h), target) + \
            pyllm.linear_cross_entropy(h, self.head.weight, target)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    check_compiles_fullgraph(_Head(), torch.randn(6, 16), {"cross_entropy": 2})


@pytest.mark.parametrize("isa", ISAS)
def test_every_cpu_isa_path(isa):
    """Each ISA variant of the CPU kernel (forced in a fresh process) meets the rule."""
    run_under_isa(isa, """
        import torch
        import test_cross_entropy as t
        for dtype in t.KERNEL_DTYPES:
            for shape in t.SHAPES:
                for options in ("plain", "all"):
                    t.test_cross_entropy(shape, dtype, options, "mean", "cpu")
        t.test_nan_like_pytorch("cpu")
    """)


@pytest.mark.parametrize("how", ["mean", "num_items_in_batch", "shift_labels"])
def test_patched_loss_function_equals_transformers(how):
    """pyllm.nn.hf_loss.causal_lm_loss (what pyllm.patch gives a causal LM)
    against transformers' ForCausalLMLoss, loss and gradient, with each way
    transformers calls it."""
    loss_utils = pytest.importorskip("transformers.loss.loss_utils")
    from pyllm.nn.hf_loss import causal_lm_loss

    gen = generator("hf loss function", how)
    logits = randn((2, 7, 30), torch.bfloat16, gen=gen, scale=2.0)
    labels = torch.randint(0, 30, (2, 7), generator=gen)
    labels[0, :2] = -100
    kw = {}
    if how == "num_items_in_batch":
        kw["num_items_in_batch"] = torch.tensor(9)
    if how == "shift_labels":
        kw["shift_labels"] = torch.roll(labels, -1, 1)
    ours, g_ours = grads(lambda x: causal_lm_loss(x, labels, 30, **kw), logits, torch.tensor(1.0))
    want, g_want = grads(lambda x: loss_utils.ForCausalLMLoss(x, labels, 30, **kw), logits,
                         torch.tensor(1.0))
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours.float(), g_want.float(), rtol=1e-2, atol=1e-4)


def _tiny_causal_lm(arch, dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    }[arch]
    if arch == "gpt2":
        config = config_cls(vocab_size=211, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    else:
        config = config_cls(vocab_size=211, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=8)
    torch.manual_seed(0)
    return model_cls(config).to(dtype).train()


@pytest.mark.parametrize("how", ["mean", "num_items_in_batch", "autocast"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_lm_head_patch(arch, how):
    """pyllm.patch(model, fused_lm_head=True): in training with labels the
    loss comes from pyllm.linear_cross_entropy (logits None) and equals the
    unpatched model's, as does every parameter's gradient; in eval mode the
    model is the unpatched one's, logits included; unpatch removes it."""
    import copy

    model = _tiny_causal_lm(arch)
    fused = copy.deepcopy(model)
    report = pyllm.patch(fused, linear=False, norms=False, attention=False, rotary=False,
                         fused_lm_head=True)
    assert ("forward (training with labels)", "lm_head + loss",
            "pyllm.linear_cross_entropy") in report.replaced, str(report)
    gen = generator("fused head", arch, how)
    ids = torch.randint(0, 211, (3, 13), generator=gen)
    labels = ids.clone()
    labels[1, :5] = -100
    kw = {"num_items_in_batch": torch.tensor(25)} if how == "num_items_in_batch" else {}

    def step(m):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "autocast"):
            out = m(input_ids=ids, labels=labels, **kw)
        out.loss.backward()
        return out, {n: p.grad for n, p in m.named_parameters()}

    (want, g_want), (got, g_got) = step(model), step(fused)
    assert got.logits is None and want.logits is not None
    assert got.loss.dtype == want.loss.dtype == torch.float32
    tol = dict(rtol=2e-2, atol=2e-3) if how == "autocast" else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.loss, want.loss, **tol)
    for name, g in g_want.items():
        torch.testing.assert_close(g_got[name], g, **tol, msg=lambda m: f"grad {name}: {m}")
    fused.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids, labels=labels).logits,
                                   model(input_ids=ids, labels=labels).logits)
    assert pyllm.unpatch(fused) == 2 and "forward" not in fused.__dict__  # + loss_function


@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])
def test_fused_lm_head_left_alone(arch):
    """A causal LM whose forward is not LLaMA's (GPT-2's head, Gemma 2's
    softcapped logits) keeps its own forward, and the report says why."""
    model = _tiny_causal_lm(arch)
    report = pyllm.patch(model, linear=False, norms=False, attention=False, rotary=False,
                         loss=False, fused_lm_head=True)
    assert "forward" not in model.__dict__
    assert any(name == "lm_head" and "not LLaMA's" in why for name, why in report.skipped), \
        str(report)
