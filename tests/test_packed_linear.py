"""Pre-packed weights (pyllm.pack_weight, pyllm.linear_packed,
pyllm.swiglu_packed; Linear/Conv1D/SwiGLU/Attention.pack(), pack_for_inference):

- the packed ops give the unpacked ops' bits in batch-invariant mode at every
  size, and in the default mode wherever the unpacked GEMM sums in the blocked
  order (more than 16 rows; 2-16 rows on AVX-512), on every ISA, for every
  dtype, odd sizes, empty ones, non-contiguous x, NaN/Inf in x, biases of
  x's dtype and float32, every activation, and SwiGLU;
- the modules read the packed copy only where that holds (no-grad CPU
  calls of the weight's dtype) and where it is the faster path (not for
  1-16 rows on ISAs without a panel skinny kernel for the weight: there the
  unpacked op's bits), on every ISA; they follow in-place changes, new tensors and
  dtype casts of the weight, keep state_dict and gradients as before;
- Attention packs q, k and v as one stacked weight: one GEMM a
  self-attention call, the unpacked module's outputs, cross-attention on
  the unpacked weights;
- pack_for_inference on pyllm's LLaMA, GPT-2 and BERT: the same logits
  (bit for bit under batch-invariant mode) and generated tokens;
- bad input gets errors naming the argument; opcheck (fakes, schemas).
"""

import itertools
import os

import pytest
import torch

import pyllm
from harness import ISAS, run_under_isa
from pyllm.nn import Conv1D, Linear, SwiGLU, pack_for_inference
from pyllm.ops.packed_linear import PackedWeight

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _same(a, b):
    """Bit-equal, NaN where NaN."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        torch.nan_to_num(a, nan=7.0), torch.nan_to_num(b, nan=7.0)) and torch.equal(
        a.isnan(), b.isnan())


def _blocked_order_everywhere(rows: int) -> bool:
    """Whether the unpacked GEMM sums in the blocked order at this many rows
    under the active ISA (default mode)."""
    from pyllm import _C

    return rows > 16 or (rows >= 2 and _C.cpu_isa() in ("avx512", "avx512_bf16"))


def _one_row_on_tiles(rows: int, dtype) -> bool:
    """One bf16 row where AMX serves the blocked path: batch-invariant mode
    sums it on the tiles, the default mode (packed too) on vdpbf16ps."""
    from pyllm import _C

    return rows == 1 and dtype == torch.bfloat16 and _C.cpu_amx()


def check_ops_match_unpacked(dtypes=DTYPES, rows=(0, 1, 2, 7, 16, 17, 100)):
    """Every case: packed == unpacked in batch-invariant mode; the default
    mode's packed call gives those bits too (its one-row calls sum in the
    blocked order), and equals the default mode's unpacked call where that
    sums in the blocked order. Returns the count."""
    gen = torch.Generator().manual_seed(11)
    cases = 0
    for dtype, M, (N, K) in itertools.product(dtypes, rows, [(77, 33), (130, 515), (1, 1),
                                                             (64, 0), (0, 40)]):
        x = torch.randn(M, 2 * K + 1, generator=gen).to(dtype)[:, 1::2]  # non-contiguous
        if M >= 2 and K >= 2:
            x[1, 1] = float("nan")
            x[M - 1, 0] = float("inf")
        w = torch.randn(N, K, generator=gen).to(dtype)
        w_up = torch.randn(N, K, generator=gen).to(dtype)
        packed, packed_up = pyllm.pack_weight(w), pyllm.pack_weight(w_up)
        for bias_dtype, act in [(None, "none"), (dtype, "gelu"), (torch.float32, "silu"),
                                (dtype, "gelu_tanh")]:
            bias = None if bias_dtype is None else torch.randn(N, generator=gen).to(bias_dtype)
            got = pyllm.linear_packed(x, packed, bias, act)
            with pyllm.batch_invariant():
                invariant = pyllm.linear(x, w, bias, act)
                assert _same(invariant, pyllm.linear_packed(x, packed, bias, act))
            if not _one_row_on_tiles(M, dtype):
                assert _same(got, invariant), (dtype, M, N, K, act)
            if _blocked_order_everywhere(M):
                assert _same(got, pyllm.linear(x, w, bias, act)), (dtype, M, N, K, act)
            cases += 1
        bias_up = torch.randn(N, generator=gen).to(dtype)
        got = pyllm.swiglu_packed(x, packed, packed_up, None, bias_up)
        with pyllm.batch_invariant():
            invariant = pyllm.swiglu(x, w, w_up, None, bias_up)
            assert _same(invariant, pyllm.swiglu_packed(x, packed, packed_up, None, bias_up))
        if not _one_row_on_tiles(M, dtype):
            assert _same(got, invariant), ("swiglu", dtype, M, N, K)
        if _blocked_order_everywhere(M):
            assert _same(got, pyllm.swiglu(x, w, w_up, None, bias_up)), ("swiglu", dtype, M, N, K)
        cases += 1
    return cases


def test_ops_match_unpacked():
    assert check_ops_match_unpacked() == 3 * 7 * 5 * 5


@pytest.mark.parametrize("threads", [1, 2])
def test_weight_read_in_place_sums_like_the_packed_weight(threads):
    """17-256 rows and at most N / threads of them: on AVX-512 the
    unpacked op reads the weight in place (x's rows packed instead, C^T =
    W x^T); the packed op runs the blocked kernel on the weight's panels.
    Both give the same bits: linear with a bias and activation, SwiGLU, every
    dtype, x's rows at and around the 64-wide panel, K with an odd pair and
    several slices, N not a multiple of the 96-row chunk or the micro-tile."""
    gen = torch.Generator().manual_seed(5)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dtype in DTYPES:
            for n, k in [(333, 515), (200, 1030)]:
                w, w_up = (torch.randn(n, k, generator=gen).to(dtype) for _ in range(2))
                w[7, 3] = float("nan")
                b = torch.randn(n, generator=gen).to(dtype)
                packed, packed_up = pyllm.pack_weight(w), pyllm.pack_weight(w_up)
                for m in (17, 63, 64, 65, 100):
                    x = torch.randn(m, k, generator=gen).to(dtype)
                    assert _same(pyllm.linear(x, w, b, "gelu"),
                                 pyllm.linear_packed(x, packed, b, "gelu")), (dtype, n, k, m)
                    assert _same(pyllm.swiglu(x, w, w_up), pyllm.swiglu_packed(x, packed, packed_up)), (
                        dtype, n, k, m)
    finally:
        torch.set_num_threads(previous)


def test_one_row_close_to_the_row_streaming_gemv():
    """One row in the default mode: the unpacked op streams the weight's rows
    (another summation order); the packed one sums in the blocked order. Both
    are within a float32 rounding of each other's values."""
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(1, 2048, generator=gen), torch.randn(300, 2048, generator=gen)
    got = pyllm.linear_packed(x, pyllm.pack_weight(w))
    exact = (x.double() @ w.double().T)
    assert (got.double() - exact).abs().max() <= 2e-6 * exact.abs().max() * 10
    assert torch.allclose(got, pyllm.linear(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("isa", ISAS)
def test_every_cpu_isa_path(isa):
    """Each ISA's packed layout (panel width; bf16 pairs on avx512_bf16),
    forced in a fresh process."""
    run_under_isa(isa, """
        from test_packed_linear import check_ops_match_unpacked
        assert check_ops_match_unpacked(rows=(1, 5, 8, 12, 17, 100)) > 0
        from test_packed_linear import test_weight_read_in_place_sums_like_the_packed_weight
        test_weight_read_in_place_sums_like_the_packed_weight(2)
    """)


def test_packed_weight_records_its_layout():
    w = torch.randn(100, 70, dtype=torch.bfloat16)
    p = pyllm.pack_weight(w)
    from pyllm import _C

    assert (p.out_features, p.in_features, p.dtype, p.isa) == (100, 70, torch.bfloat16,
                                                               _C.cpu_isa())
    assert p.nbytes == p.panels.numel() * 4
    # a copy: later changes to the weight are not in it
    before = pyllm.linear_packed(torch.ones(3, 70, dtype=torch.bfloat16), p)
    w.mul_(2)
    assert torch.equal(before, pyllm.linear_packed(torch.ones(3, 70, dtype=torch.bfloat16), p))


def _mapping_of(address: int) -> dict:
    """The /proc/self/smaps fields of the mapping that holds ``address``."""
    import re

    fields, inside = {}, False
    with open("/proc/self/smaps") as f:
        for line in f:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
            if m:
                if inside:
                    break
                inside = int(m.group(1), 16) <= address < int(m.group(2), 16)
            elif inside and ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
    return fields


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_packed_weights_ask_for_huge_pages(dtype):
    """A packed weight of 2 MiB or more lies on a 2 MiB boundary in a mapping
    advised for transparent huge pages (THPeligible), so that a decode step
    streams it with few TLB misses; its outputs are those of the weight, and
    freeing it returns the memory (packing it 40 times does not grow the
    process by 40 copies)."""
    w = torch.randn(1500, 1001, dtype=dtype)  # 3-6 MB packed, odd K
    p = pyllm.pack_weight(w)
    assert p.nbytes >= 2 << 20 and p.panels.data_ptr() % (2 << 20) == 0
    mapping = _mapping_of(p.panels.data_ptr())
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp = f.read()
    if "[never]" not in thp:
        assert mapping.get("THPeligible") == "1", mapping
    for rows in (1, 3, 40):  # the same bits as the unpacked weight's blocked order
        x = torch.randn(rows, 1001, dtype=dtype)
        with pyllm.batch_invariant():
            assert _same(pyllm.linear_packed(x, p), pyllm.linear(x, w)), rows

    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    del p
    before = resident()
    for _ in range(40):
        q = pyllm.pack_weight(w)
        del q
    assert resident() - before < 10 * pyllm.pack_weight(w).nbytes


def test_bad_input():
    x = torch.randn(4, 32)
    w = torch.randn(16, 32)
    p = pyllm.pack_weight(w)
    with pytest.raises(TypeError, match="packed must be a pyllm.ops.packed_linear.PackedWeight"):
        pyllm.linear_packed(x, w)
    with pytest.raises(TypeError, match="packed was packed from a torch.float32 weight; x must"):
        pyllm.linear_packed(x.bfloat16(), p)
    with pytest.raises(ValueError, match="packed has in_features 32, the last dimension of x is 31"):
        pyllm.linear_packed(x[:, :31], p)
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
        pyllm.linear_packed(x, p, torch.zeros(15))
    with pytest.raises(ValueError, match="activation must be one of"):
        pyllm.linear_packed(x, p, None, "relu")
    with pytest.raises(ValueError, match="packed_up must have 16 out_features like packed_gate"):
        pyllm.swiglu_packed(x, p, pyllm.pack_weight(torch.randn(15, 32)))
    other = "avx2" if p.isa != "avx2" else "generic"
    with pytest.raises(ValueError, match=f"packed was packed for the {other} instruction set"):
        pyllm.linear_packed(x, PackedWeight(p.panels, 16, 32, torch.float32, other))
    with pytest.raises(TypeError, match="weight must be float32, bfloat16, float16, got torch.float64"):
        pyllm.pack_weight(w.double())
    with pytest.raises(ValueError, match="weight must have 2 dimension"):
        pyllm.pack_weight(w[0])
    # the operator guards its memory whatever Python passed
    with pytest.raises(ValueError, match="packed must be pyllm::pack_linear_weight of an"):
        torch.ops.pyllm.linear_packed(x, p.panels[:, :5], 16, None, "none")
    with pytest.raises(ValueError, match="packed must be pyllm::pack_linear_weight of an"):
        torch.ops.pyllm.linear_packed(x, p.panels, 200, None, "none")
    with pytest.raises(ValueError, match="packed must be pyllm::pack_linear_weight of an"):
        torch.ops.pyllm.linear_packed(x.half(), p.panels, 16, None, "none") if p.panels.dtype == \
            torch.int32 else torch.ops.pyllm.linear_packed(x, p.panels.int(), 16, None, "none")
    with pytest.raises(ValueError, match="out_features must be >= 0"):
        torch.ops.pyllm.linear_packed(x, p.panels, -1, None, "none")
    with pytest.raises(RuntimeError, match="derivative for pyllm::linear_packed"):
        torch.ops.pyllm.linear_packed(x.requires_grad_(), p.panels, 16, None,
                                      "none").sum().backward()


def test_opcheck():
    x = torch.randn(9, 32)
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(24, 32, dtype=dtype)
        torch.library.opcheck(torch.ops.pyllm.pack_linear_weight.default, (w,))
        p = torch.ops.pyllm.pack_linear_weight(w)
        torch.library.opcheck(torch.ops.pyllm.linear_packed.default,
                              (x.to(dtype), p, 24, torch.randn(24), "gelu"))
        torch.library.opcheck(torch.ops.pyllm.swiglu_packed.default,
                              (x.to(dtype), p, p, 24, None, None))


# -- modules -------------------------------------------------------------------


def _modules(dtype):
    torch.manual_seed(0)
    linear = Linear(70, 130, activation="gelu", dtype=dtype)
    conv = Conv1D(130, 70, dtype=dtype)
    mlp = SwiGLU(70, 150, bias=True, dtype=dtype)
    return linear, conv, mlp


@pytest.mark.parametrize("dtype", DTYPES)
def test_modules_pack(dtype):
    x = torch.randn(3, 11, 70, dtype=dtype)
    for module in _modules(dtype):
        keys = list(module.state_dict())
        with torch.no_grad():
            with pyllm.batch_invariant():
                want = module(x)
            want_one = module(x[:1, :1])
            assert module.pack() is module and module.is_packed
            assert module.packed_nbytes() > 0
            assert list(module.state_dict()) == keys
            assert _same(module(x), want)  # 33 rows: the blocked order either way
            with pyllm.batch_invariant():
                one = module(x[:1, :1])
            # one row: the packed op (blocked order, as batch-invariant mode)
            # where it serves few rows, else the unpacked op itself
            expect_one = one if _packed_serves_few_rows(dtype) else want_one
            assert _same(module(x[:1, :1]), expect_one)
            assert torch.allclose(one.float(), want_one.float(), rtol=1e-2, atol=1e-3)
        module.unpack()
        assert not module.is_packed and module.packed_nbytes() == 0


def _packed_serves_few_rows(dtype) -> bool:
    """Whether pyllm.nn's modules read their packed copy for 1-16 rows under
    the active ISA: where the packed ops have a skinny kernel on panels no
    wider than the weight (AVX-512 for float32, AVX512-BF16 for bf16)."""
    from pyllm import _C

    isa = _C.cpu_isa()
    return isa == "avx512_bf16" and dtype != torch.float16 or (
        isa == "avx512" and dtype == torch.float32)


def check_modules_choose_the_faster_path():
    """Per dtype and row count: the module calls the packed op exactly where
    it is the faster path, and otherwise gives the unpacked module's bits
    (in batch-invariant mode, always the packed op). Returns the count."""
    cases = 0
    for dtype in DTYPES:
        for module in _modules(dtype):
            module.requires_grad_(False)
            for rows in (1, 5, 16, 17):
                x = torch.randn(rows, 70, dtype=dtype)
                want = module(x)
                module.pack()
                packed = rows > 16 or _packed_serves_few_rows(dtype)
                assert _calls_packed(module, x) == packed, (type(module), dtype, rows)
                if not packed:
                    assert _same(module(x), want)
                with pyllm.batch_invariant():
                    assert _calls_packed(module, x)
                module.unpack()
                cases += 1
    return cases


def test_modules_choose_the_faster_path():
    assert check_modules_choose_the_faster_path() == 3 * 3 * 4


@pytest.mark.parametrize("isa", ISAS)
def test_modules_choose_the_faster_path_on_every_isa(isa):
    run_under_isa(isa, """
        from test_packed_linear import check_modules_choose_the_faster_path
        assert check_modules_choose_the_faster_path() > 0
    """)


def _calls_packed(module, x):
    """Whether module(x) went through the packed op (counted by the profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        module(x)
    names = {e.key for e in prof.key_averages()}
    return any(n.endswith("_packed") for n in names)


def test_modules_use_the_packed_copy_only_where_it_is_exact():
    linear, conv, mlp = _modules(torch.float32)
    x = torch.randn(20, 70)
    for module in (linear, conv, mlp):
        module.pack()
        assert not _calls_packed(module, x)  # grad mode, parameters requiring grad
        with torch.no_grad():
            assert _calls_packed(module, x)
            assert not _calls_packed(module, x.double()) if module is not mlp else True
            with pyllm.use_backend("reference"):
                assert not _calls_packed(module, x)
        with torch.inference_mode():
            assert _calls_packed(module, x)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            assert not _calls_packed(module, x)  # x cast to bf16, the weight float32
        module.requires_grad_(False)
        assert _calls_packed(module, x)
        assert not _calls_packed(module, x.clone().requires_grad_())
        module.requires_grad_(True)


def test_modules_gradients_unchanged_by_packing():
    for module in _modules(torch.float32):
        x = torch.randn(20, 70, requires_grad=True)
        want = torch.autograd.grad(module(x).square().sum(), [x, *module.parameters()])
        module.pack()
        got = torch.autograd.grad(module(x).square().sum(), [x, *module.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_modules_follow_changes_of_the_weight():
    linear, conv, mlp = _modules(torch.float32)
    x = torch.randn(20, 70)
    for module in (linear, conv, mlp):
        module.pack()
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(1.5)  # in place
            assert _same(module(x), module.unpack()(x))
            module.pack()
            module.load_state_dict({k: v * 0.5 for k, v in module.state_dict().items()})
            packed_out = module(x)
            assert _same(packed_out, module.unpack()(x))
            module.pack()
            module.to(torch.bfloat16)  # new tensors of another dtype
            xb = x.bfloat16()
            packed_out = module(xb)
            assert _calls_packed(module, xb)
            assert _same(packed_out, module.unpack()(xb))
        module.to(torch.float32)


def _packed_calls(module, *args, **kwargs):
    """How many packed-op calls module(*args) made (the profiler's count)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        module(*args, **kwargs)
    return sum(e.count for e in prof.key_averages() if e.key.endswith("_packed"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_attention_packs_q_k_v_as_one_weight(dtype, bias):
    from pyllm.nn import Attention

    torch.manual_seed(3)
    attn = Attention(72, 6, 2, bias=bias, rope_base=10000.0, dtype=dtype).requires_grad_(False)
    for p in attn.parameters():
        p.normal_(0, 0.2)
    x = torch.randn(2, 19, 72, dtype=dtype)[:, ::2]  # non-contiguous, 10 tokens a sequence
    step = torch.randn(2, 1, 72, dtype=dtype)

    def run():
        cache = attn.new_cache(2, 16)
        return attn(x, cache=cache), attn(step, cache=cache)

    with pyllm.batch_invariant():
        want = run()
    want_default = run()
    attn.pack()
    assert attn.is_packed and attn.packed_nbytes() > 0 and attn.o_proj.is_packed
    assert not attn.q_proj.is_packed  # q, k and v live in the one stacked copy
    with pyllm.batch_invariant():
        got = run()
        # one GEMM for q, k and v, one for o_proj
        assert _packed_calls(attn, x, cache=attn.new_cache(2, 16)) == 2
    assert all(_same(a, b) for a, b in zip(got, want))
    # the default mode: 20 rows sum in the blocked order either way; the
    # decode rows within rounding of the three unpacked GEMVs
    got_default = run()
    assert _same(got_default[0], want_default[0])
    tol = (2e-2 if dtype != torch.float32 else 1e-5) * want_default[1].float().abs().max()
    assert (got_default[1].float() - want_default[1].float()).abs().max() <= tol
    # cross-attention reads the unpacked q, k, v weights
    context = torch.randn(2, 5, 72, dtype=dtype)
    cross = Attention(72, 6, 2, bias=bias, causal=False, dtype=dtype).requires_grad_(False)
    plain = cross(x, context)
    cross.pack()
    assert _same(cross(x, context), plain) and _packed_calls(cross, x, context) == 1
    # an in-place change of one of the three weights is followed
    with torch.no_grad():
        attn.k_proj.weight.mul_(-1.0)
        with pyllm.batch_invariant():
            changed = run()
            assert _same(changed[0], attn.unpack()(x, cache=attn.new_cache(2, 16)))
    assert not attn.is_packed and not attn.o_proj.is_packed


def test_attention_with_another_context_width_packs_only_o_proj():
    from pyllm.nn import Attention

    attn = Attention(32, 4, kv_size=24, causal=False).pack()
    assert not attn.is_packed and attn.o_proj.is_packed


# -- models ----------------------------------------------------------------------


def _llama(dtype):
    from pyllm.models.llama import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=150,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0,
                         tie_word_embeddings=False, rope_parameters=None,
                         max_position_embeddings=128)
    return LlamaForCausalLM(config, dtype=dtype)


def _gpt2(dtype):
    transformers = pytest.importorskip("transformers")
    from pyllm.models import GPT2LMHeadModel

    config = transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=48, n_layer=2,
                                     n_head=4)
    torch.manual_seed(0)
    return GPT2LMHeadModel.from_hf(transformers.GPT2LMHeadModel(config).eval()).to(dtype)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("build", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_pack_for_inference(build, dtype):
    torch.manual_seed(1)
    model = build(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    ids = torch.randint(0, 97, (3, 19))
    with torch.no_grad():
        want = _logits(model(ids))
        want_step = _logits(model(ids[:, :1]))
        with pyllm.batch_invariant():
            want_invariant = model.generate(ids, 8)
    report = model.pack_for_inference()
    assert report.modules and report.nbytes > 0 and "packed" in str(report)
    with torch.no_grad():
        assert _calls_packed(model, ids)
        assert _same(_logits(model(ids)), want)  # 57 rows
        # every op as in batch-invariant mode: the same bits, so the same tokens
        with pyllm.batch_invariant():
            assert torch.equal(model.generate(ids, 8), want_invariant)
        # the default mode's few-row calls: the same values within rounding
        step = _logits(model(ids[:, :1]))
        scale = want_step.float().abs().max()
        tol = (2e-2 if dtype == torch.bfloat16 else 1e-5) * scale
        assert (step.float() - want_step.float()).abs().max() <= tol
        assert model.generate(ids, 8).shape == (3, 27)
    model.unpack_weights()
    assert not any(getattr(m, "is_packed", False) for m in model.modules())


def test_pack_for_inference_on_a_bert_and_a_plain_module():
    transformers = pytest.importorskip("transformers")
    from pyllm.models import BertModel

    config = transformers.BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=100)
    torch.manual_seed(0)
    model = BertModel.from_hf(transformers.BertModel(config).eval())
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        want = model(ids)
        report = model.pack_for_inference()
        got = model(ids)
    assert len(report.modules) == 2 * 6 + 1  # q, k, v, o, up, down a layer, the pooler
    for a, b in zip(want if isinstance(want, tuple) else want.__dict__.values(),
                    got if isinstance(got, tuple) else got.__dict__.values()):
        if isinstance(a, torch.Tensor):
            assert _same(a, b)
    # a module that is not pyllm's own: its pyllm layers are packed
    seq = torch.nn.Sequential(Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    assert pack_for_inference(seq).modules == ["0"]
