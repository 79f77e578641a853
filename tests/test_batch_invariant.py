"""Batch-invariant mode (pyllm.batch_invariant()): every op gives a row, token
or sequence the same bits whatever else is in the batch, wherever it sits,
and whether its token comes in a prefill or a decode step.

Random batch compositions (subsets of rows in random order, sequences of
random lengths packed with others, prefill chunks against one-token decode
steps, contiguous against paged keys) are compared bitwise with torch.equal.
The functions take a backend: the CPU kernels here, the Triton kernels in the
interpreter (tests/interpreter/test_triton_batch_invariant.py); the CUDA
kernels on the host model at the end of this file. A control test shows that
the comparison can fail: outside the mode the CPU GEMM and the split-KV decode
do give other bits."""

import pytest
import torch

import pyllm
from harness import ISAS, run_under_isa

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _compositions(gen, rows, count=6):
    """Random sub-batches of range(rows): (index tensor) in random order, sizes
    1, 2, a few, and all of them shuffled."""
    sizes = [1, 2, min(rows, 5), min(rows, 17), rows] + [
        int(torch.randint(1, rows + 1, (1,), generator=gen)) for _ in range(count - 5)]
    return [torch.randperm(rows, generator=gen)[:m] for m in sizes]


def _equal(ours, expected, what):
    assert ours.dtype == expected.dtype and ours.shape == expected.shape, what
    if not torch.equal(ours, expected):
        diff = (ours.double() - expected.double()).abs().max().item()
        raise AssertionError(f"{what}: not bitwise equal (largest difference {diff:.3g})")


def check_rows(fn, inputs, what, seed=0):
    """fn(*row_inputs) computed on the whole batch and on random sub-batches:
    each row's result is the same bits. `inputs`: tensors whose first dimension
    is the row (the others are passed through)."""
    full = fn(*inputs)
    rows = full.shape[0]
    for idx in _compositions(_gen(seed), rows):
        part = fn(*[t[idx] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == rows else t
                    for t in inputs])
        _equal(part, full[idx], f"{what}: rows {idx.tolist()}")


# -- GEMM ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["none", "gelu_tanh", "silu"])
def test_linear(dtype, act, backend="cpu"):
    gen = _gen(1)
    x, w, b = _randn(gen, 41, 67, dtype=dtype), _randn(gen, 83, 67, dtype=dtype, scale=0.2), \
        _randn(gen, 83, dtype=dtype)
    with pyllm.batch_invariant():
        check_rows(lambda x: pyllm.linear(x, w, b, act, backend=backend), [x],
                   f"linear {act} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu(dtype, backend="cpu"):
    gen = _gen(2)
    x = _randn(gen, 37, 64, dtype=dtype)
    wg, wu = _randn(gen, 50, 64, dtype=dtype, scale=0.2), _randn(gen, 50, 64, dtype=dtype, scale=0.2)
    with pyllm.batch_invariant():
        check_rows(lambda x: pyllm.swiglu(x, wg, wu, backend=backend), [x], f"swiglu {dtype}")


def test_linear_3d_batches(backend="cpu"):
    """A (batch, seq, hidden) input: a sequence's rows alone or in the batch."""
    gen = _gen(3)
    x, w = _randn(gen, 6, 9, 48), _randn(gen, 40, 48, scale=0.2)
    with pyllm.batch_invariant():
        check_rows(lambda x: pyllm.linear(x, w, backend=backend), [x], "linear (batch, seq)")


# -- norms, rotary, cross-entropy -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm"])
def test_norms(op, dtype, backend="cpu"):
    gen = _gen(4)
    n = 200
    x, r = _randn(gen, 33, n, dtype=dtype), _randn(gen, 33, n, dtype=dtype)
    w, b = _randn(gen, n, dtype=dtype), _randn(gen, n, dtype=dtype)
    fns = {
        "rms_norm": lambda x, r: pyllm.rms_norm(x, w, 1e-6, backend=backend),
        "layer_norm": lambda x, r: pyllm.layer_norm(x, w, b, 1e-5, backend=backend),
        "add_rms_norm": lambda x, r: torch.cat(pyllm.add_rms_norm(x, r, w, 1e-6, backend=backend), 1),
        "add_layer_norm": lambda x, r: torch.cat(
            pyllm.add_layer_norm(x, r, w, b, 1e-5, backend=backend), 1),
    }
    with pyllm.batch_invariant():
        check_rows(fns[op], [x, r], f"{op} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary(dtype, backend="cpu"):
    gen = _gen(5)
    cos, sin = pyllm.rotary_tables(16, 64)
    q, k = _randn(gen, 21, 4, 32, dtype=dtype), _randn(gen, 21, 2, 32, dtype=dtype)
    positions = torch.randint(0, 64, (21,), generator=gen)

    def fn(q, k, positions):
        from test_rotary import call

        q, k = q.clone(), k.clone()
        call(backend, q[None], k[None], cos, sin, positions[None])
        return torch.cat([q.flatten(1), k.flatten(1)], 1)

    with pyllm.batch_invariant():
        check_rows(fn, [q, k, positions], f"rotary {dtype}")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_cross_entropy(dtype, backend="cpu"):
    gen = _gen(6)
    logits, target = _randn(gen, 29, 301, dtype=dtype), torch.randint(0, 301, (29,), generator=gen)
    if backend == "cuda-host":
        from test_cross_entropy import host_cross_entropy

        fn = lambda z, t: host_cross_entropy(z.contiguous(), t.contiguous(), -100, 0.1, 1e-4, 0.0,  # noqa: E731
                                             True)[2]
    else:
        fn = lambda z, t: pyllm.cross_entropy(z, t, reduction="none", label_smoothing=0.1,  # noqa: E731
                                              z_loss=1e-4, backend=backend)
    with pyllm.batch_invariant():
        check_rows(fn, [logits, target], f"cross_entropy {dtype}")


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_paged_kv_append(dtype, backend="cpu"):
    """New tokens' keys (rotated on the way) and values written into pages:
    a sequence's pages are the same bits whether its tokens come alone or in a
    batch with others'."""
    from test_paged_kv_append import append

    gen = _gen(14)
    tokens, heads, dim, page_size = 23, 2, 32, 4
    k, v = _randn(gen, tokens, heads, dim, dtype=dtype), _randn(gen, tokens, heads, dim, dtype=dtype)
    positions = torch.randint(0, 64, (tokens,), generator=gen)
    cos, sin = pyllm.rotary_tables(16, 64)

    def fn(k, v, positions):
        rows = k.shape[0]  # row i into slot i of fresh pages
        pages = torch.zeros((rows + page_size - 1) // page_size, page_size, heads, dim, dtype=dtype)
        k_pages, v_pages = pages.clone(), pages.clone()
        append(backend, k_pages, v_pages, k.contiguous(), v.contiguous(),
               torch.arange(rows, dtype=torch.int32), cos=cos, sin=sin, positions=positions)
        return torch.cat([k_pages.flatten(0, 1), v_pages.flatten(0, 1)], 1)[:rows]

    with pyllm.batch_invariant():
        check_rows(fn, [k, v, positions], f"paged_kv_append {dtype}")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_linear_cross_entropy(dtype, backend="cpu"):
    gen = _gen(7)
    hidden, weight = _randn(gen, 35, 48, dtype=dtype), _randn(gen, 211, 48, dtype=dtype, scale=0.2)
    target = torch.randint(0, 211, (35,), generator=gen)
    with pyllm.batch_invariant():
        check_rows(lambda h, t: pyllm.linear_cross_entropy(h, weight, t, reduction="none",
                                                           backend=backend),
                   [hidden, target], f"linear_cross_entropy {dtype}")


# -- attention --------------------------------------------------------------------------------

# (heads, heads_kv, head_dim, options)
ATTENTION_VARIANTS = {
    "causal": (4, 2, 32, dict(causal=True)),
    "window": (4, 4, 64, dict(causal=True, window_size=(37, 0), softcap=20.0)),
    "alibi": (2, 1, 40, dict(causal=True, alibi_slopes=torch.tensor([0.25, 0.0625]))),
    "bidirectional": (2, 2, 16, dict(causal=False)),
}


def _sequences(gen, count, heads, heads_kv, dim, dtype):
    """(q, k, v) per sequence, lengths 1..150 (keys at least as many as queries)."""
    out = []
    for _ in range(count):
        lk = int(torch.randint(1, 150, (1,), generator=gen))
        lq = int(torch.randint(1, lk + 1, (1,), generator=gen))
        out.append((_randn(gen, lq, heads, dim, dtype=dtype), _randn(gen, lk, heads_kv, dim, dtype=dtype),
                    _randn(gen, lk, heads_kv, dim, dtype=dtype)))
    return out


def _varlen(seqs, backend, options):
    q = torch.cat([s[0] for s in seqs])
    k = torch.cat([s[1] for s in seqs])
    v = torch.cat([s[2] for s in seqs])
    cu = lambda lens: torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)  # noqa: E731
    cu_q, cu_k = cu([len(s[0]) for s in seqs]), cu([len(s[1]) for s in seqs])
    out = pyllm.attention_varlen(q, k, v, cu_q, cu_k, int((cu_q[1:] - cu_q[:-1]).max()),
                                 int((cu_k[1:] - cu_k[:-1]).max()), backend=backend, **options)
    return out.split([len(s[0]) for s in seqs])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(ATTENTION_VARIANTS))
def test_attention_varlen_packing(variant, dtype, backend="cpu"):
    """A sequence alone, or packed with others of random lengths in random order."""
    heads, heads_kv, dim, options = ATTENTION_VARIANTS[variant]
    gen = _gen(8)
    seqs = _sequences(gen, 7, heads, heads_kv, dim, dtype)
    with pyllm.batch_invariant():
        alone = [_varlen([s], backend, options)[0] for s in seqs]
        for idx in _compositions(gen, len(seqs), count=5):
            packed = _varlen([seqs[i] for i in idx], backend, options)
            for i, out in zip(idx.tolist(), packed):
                _equal(out, alone[i], f"{variant}: sequence {i} packed as {idx.tolist()}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", [v for v, c in ATTENTION_VARIANTS.items() if c[3]["causal"]])
def test_attention_prefill_equals_decode(variant, dtype, backend="cpu"):
    """Query t of a prefill, of a chunk of a chunked prefill, or decoded alone
    against keys 0..t (a KV cache): the same bits; dense layout, batches of
    one and of three."""
    heads, heads_kv, dim, options = ATTENTION_VARIANTS[variant]
    gen = _gen(9)
    batch, length = 3, 131
    q = _randn(gen, batch, length, heads, dim, dtype=dtype)
    k = _randn(gen, batch, length, heads_kv, dim, dtype=dtype)
    v = _randn(gen, batch, length, heads_kv, dim, dtype=dtype)
    run = lambda q, k, v: pyllm.attention(q, k, v, backend=backend, **options)  # noqa: E731
    with pyllm.batch_invariant():
        full = run(q, k, v)
        for t in (0, 1, 16, 63, 64, 65, 100, length - 1):
            for b in (0, 2):
                _equal(run(q[b:b + 1, t:t + 1], k[b:b + 1, :t + 1], v[b:b + 1, :t + 1]),
                       full[b:b + 1, t:t + 1], f"{variant}: decode of query {t}, sequence {b}")
            _equal(run(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1]), full[:, t:t + 1],
                   f"{variant}: decode of query {t}, batch of {batch}")
        for t0, t1 in ((0, 5), (5, 8), (60, 70), (70, 131)):  # chunks of a chunked prefill
            _equal(run(q[:, t0:t1], k[:, :t1], v[:, :t1]), full[:, t0:t1],
                   f"{variant}: prefill chunk [{t0}, {t1})")


@pytest.mark.parametrize("page_size", [16, 5])
def test_attention_paged_equals_contiguous(page_size, backend="cpu"):
    """Decode steps through a paged cache (shuffled pages, sequences of
    different lengths) equal the contiguous prefill's rows."""
    gen = _gen(10)
    heads, heads_kv, dim = 4, 2, 32
    lens = [9, 70, 33]
    seqs = [(_randn(gen, n, heads, dim), _randn(gen, n, heads_kv, dim), _randn(gen, n, heads_kv, dim))
            for n in lens]
    per_seq = max((n + page_size - 1) // page_size for n in lens)
    pages = len(lens) * per_seq
    order = torch.randperm(pages, generator=gen).to(torch.int32)
    table = order.view(len(lens), per_seq)
    k_pages = torch.zeros(pages, page_size, heads_kv, dim)
    v_pages = torch.zeros(pages, page_size, heads_kv, dim)
    for s, (_, k, v) in enumerate(seqs):
        for i in range(len(k)):
            k_pages[table[s, i // page_size], i % page_size] = k[i]
            v_pages[table[s, i // page_size], i % page_size] = v[i]
    with pyllm.batch_invariant():
        full = [_varlen([s], backend, dict(causal=True))[0] for s in seqs]
        for t_back in (1, 2, 5):  # decode the last query of each, at lengths n - t_back + 1
            lengths = torch.tensor([n - t_back + 1 for n in lens], dtype=torch.int32)
            q = torch.stack([s[0][n - 1] for s, n in zip(seqs, lengths.tolist())])[:, None]
            out = pyllm.attention_paged(q, k_pages, v_pages, table, lengths, causal=True,
                                        backend=backend)
            for s, n in enumerate(lengths.tolist()):
                _equal(out[s, 0], full[s][n - 1], f"paged decode, sequence {s}, length {n}")


@pytest.mark.parametrize("isa", ISAS)
def test_every_cpu_isa_path(isa):
    """Each ISA's kernels (forced in a fresh process): the GEMM (blocked, or
    AVX-512's skinny kernel in the blocked order) and attention."""
    run_under_isa(isa, """
        import torch
        import test_batch_invariant as t
        for dtype in (torch.float32, torch.bfloat16):
            t.test_linear(dtype, "silu")
            t.test_swiglu(dtype)
            t.test_attention_prefill_equals_decode("window", dtype)
        t.test_attention_varlen_packing("alibi", torch.bfloat16)
    """)


def test_outside_the_mode_the_comparisons_fail():
    """The control: without the mode the CPU's GEMV path and its split-KV
    decode give other bits, so the comparisons above can fail."""
    gen = _gen(11)
    x, w = _randn(gen, 40, 300), _randn(gen, 128, 300)
    assert not torch.equal(pyllm.linear(x[:1], w, backend="cpu"), pyllm.linear(x, w, backend="cpu")[:1])
    q, k, v = _randn(gen, 1, 1000, 4, 64), _randn(gen, 1, 1000, 4, 64), _randn(gen, 1, 1000, 4, 64)
    full = pyllm.attention(q, k, v, causal=True, backend="cpu")
    decode = pyllm.attention(q[:, -1:], k, v, causal=True, backend="cpu")
    assert not torch.equal(decode, full[:, -1:])
    with pyllm.batch_invariant():
        full = pyllm.attention(q, k, v, causal=True, backend="cpu")
        _equal(pyllm.attention(q[:, -1:], k, v, causal=True, backend="cpu"), full[:, -1:], "decode")


def test_switch():
    assert not pyllm.is_batch_invariant()
    with pyllm.batch_invariant():
        assert pyllm.is_batch_invariant() and pyllm._C.batch_invariant()
        with pyllm.batch_invariant(False):
            assert not pyllm.is_batch_invariant() and not pyllm._C.batch_invariant()
        assert pyllm.is_batch_invariant()
    assert not pyllm.is_batch_invariant() and not pyllm._C.batch_invariant()
    with pytest.raises(RuntimeError):
        with pyllm.batch_invariant():
            raise RuntimeError("restored on the way out")
    assert not pyllm.is_batch_invariant()


# -- models -----------------------------------------------------------------------------------


def _tiny_llama(dtype):
    transformers = pytest.importorskip("transformers")
    from pyllm.models import LlamaForCausalLM

    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=150,
                                      num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM.from_hf(transformers.LlamaForCausalLM(config)).to(dtype).eval()


def _prompts(gen, count, vocab=97):
    lengths = torch.randint(1, 40, (count,), generator=gen).tolist()
    return [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]


def _left_padded(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    return ids, mask


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_greedy_generation_of_a_batch_equals_each_alone(dtype):
    """LLaMA-style model, prompts of random lengths, random batch compositions:
    each sequence's greedy tokens and every step's logits are the same bits as
    when it is generated alone."""
    model = _tiny_llama(dtype)
    gen = _gen(12)
    prompts = _prompts(gen, 6)

    def generate(group):
        ids, mask = _left_padded([prompts[i] for i in group])
        steps = []
        logits_of = model.forward

        def recording(*args, **kwargs):
            out = logits_of(*args, **kwargs)
            steps.append(out[:, -1].clone())
            return out
        model.forward = recording
        try:
            tokens = model.generate(ids, 12, attention_mask=mask)
        finally:
            del model.forward
        width = ids.shape[1]
        return ([tokens[j, width:] for j in range(len(group))],
                [torch.stack([s[j] for s in steps]) for j in range(len(group))])

    with pyllm.batch_invariant():
        alone = [generate([i]) for i in range(len(prompts))]
        for idx in _compositions(gen, len(prompts), count=5):
            tokens, logits = generate(idx.tolist())
            for j, i in enumerate(idx.tolist()):
                _equal(tokens[j], alone[i][0][0], f"tokens of sequence {i} in {idx.tolist()}")
                _equal(logits[j], alone[i][1][0], f"logits of sequence {i} in {idx.tolist()}")


@pytest.mark.parametrize("paged", [False, True])
def test_decode_logits_equal_the_full_forward(paged):
    """A token's logits from a prefill + decode steps through a KV cache
    (contiguous or paged) are the same bits as the cache-free forward's."""
    model = _tiny_llama(torch.float32)
    ids = torch.randint(0, 97, (1, 50), generator=_gen(13))
    with pyllm.batch_invariant(), torch.no_grad():
        full = model(ids)
        caches = model.new_paged_caches(1, 64, 16) if paged else model.new_caches(1, 64)
        cu = torch.tensor([0, 30], dtype=torch.int32)
        first = model(ids[:, :30], None, caches, cu_seqlens=cu) if paged else \
            model(ids[:, :30], None, caches)
        _equal(first.reshape(full[:, :30].shape), full[:, :30], "prefill logits")
        for t in range(30, 50):
            step = model(ids[:, t:t + 1], None, caches)
            _equal(step, full[:, t:t + 1], f"decode step at position {t}")


# -- the CUDA kernels on the host model -------------------------------------------------------

HOST_DTYPES = (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", HOST_DTYPES, ids=str)
def test_cuda_host_rows_ops(dtype):
    """rotary, cross-entropy and the paged-cache append, row by row."""
    test_rotary(dtype, "cuda-host")
    test_cross_entropy(dtype, "cuda-host")
    test_paged_kv_append(torch.float16, "cuda-host")


@pytest.mark.parametrize("dtype", HOST_DTYPES, ids=str)
def test_cuda_host_gemm(dtype):
    """The CUDA GEMM's two tiles (m <= 64 and above) sum every output alike:
    row subsets of 1..130 rows, plain, with an activation, and SwiGLU."""
    from test_cuda_host_linear import host_gemm

    gen = _gen(20)
    x = _randn(gen, 130, 72, dtype=dtype)
    w, w2 = _randn(gen, 48, 72, dtype=dtype, scale=0.2), _randn(gen, 48, 72, dtype=dtype, scale=0.2)
    b = _randn(gen, 48)
    check_rows(lambda x: host_gemm(x, w, bias=b, activation="silu"), [x], "CUDA gemm silu")
    check_rows(lambda x: host_gemm(x, w, b2=w2, epilogue="swiglu"), [x], "CUDA gemm swiglu")


@pytest.mark.parametrize("op", ["rms_norm", "add_layer_norm"])
@pytest.mark.parametrize("n", [200, 4096])  # a warp per row; the CTA per row
def test_cuda_host_norms(op, n):
    from test_cuda_host_norms import host_forward
    from test_norms import Norm

    norm = Norm(op)
    x, r, w, b = norm.inputs((19, n), torch.bfloat16, "same", "cuda-host-invariant")

    def fn(x, r):
        y, s, _, _ = host_forward(norm, x.contiguous(), r.contiguous() if norm.fused else None,
                                  w, b, 1e-5)
        return y if s is None else torch.cat([y, s], 1)

    check_rows(fn, [x, r if r is not None else torch.zeros(19)], f"CUDA {op}")


def _host_attention(q, k, v, **options):
    from test_cuda_host_attention import HostAttention

    return HostAttention(q.contiguous(), k.contiguous(), v.contiguous(), batch_invariant=True,
                         **options).forward()[0]


@pytest.mark.parametrize("variant", ["causal", "window"])
def test_cuda_host_attention_prefill_equals_decode(variant):
    """Decode queries (the split-KV path outside the mode) against the rows
    of the prefill kernel, and prefill chunks."""
    heads, heads_kv, dim, options = ATTENTION_VARIANTS[variant]
    options = {k: v for k, v in options.items() if k != "alibi_slopes"}
    gen = _gen(21)
    length = 300  # the decode path is taken from 256 keys on
    q = _randn(gen, 2, length, heads, dim, dtype=torch.float16)
    k = _randn(gen, 2, length, heads_kv, dim, dtype=torch.float16)
    v = _randn(gen, 2, length, heads_kv, dim, dtype=torch.float16)
    full = _host_attention(q, k, v, **options)
    for t in (256, 270, length - 1):
        _equal(_host_attention(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], **options),
               full[:, t:t + 1], f"CUDA {variant}: decode of query {t}")
        _equal(_host_attention(q[1:, t:t + 1], k[1:, :t + 1], v[1:, :t + 1], **options),
               full[1:, t:t + 1], f"CUDA {variant}: decode of query {t}, sequence 1 alone")
    # the control: outside the mode the split-KV decode gives other bits
    from test_cuda_host_attention import HostAttention

    # (causal: all 300 keys are split; a window of 38 keys fits one split)
    if variant == "causal":
        split = HostAttention(q[:, -1:].contiguous(), k.contiguous(), v.contiguous(),
                              **options).forward()[0]
        assert not torch.equal(split, full[:, -1:])
    for t0, t1 in ((0, 3), (100, 170), (290, 300)):
        _equal(_host_attention(q[:, t0:t1], k[:, :t1], v[:, :t1], **options), full[:, t0:t1],
               f"CUDA {variant}: prefill chunk [{t0}, {t1})")


def test_cuda_host_attention_varlen_packing():
    from test_cuda_host_attention import HostAttention

    heads, heads_kv, dim, options = ATTENTION_VARIANTS["window"]
    gen = _gen(22)
    seqs = _sequences(gen, 4, heads, heads_kv, dim, torch.bfloat16)

    def packed(group):
        q, k, v = (torch.cat([seqs[i][j] for i in group]) for j in range(3))
        cu = lambda j: torch.tensor([0] + [len(seqs[i][j]) for i in group]).cumsum(0).to(torch.int32)  # noqa: E731
        out = HostAttention(q, k, v, cu(0), cu(1), batch_invariant=True, **options).forward()[0]
        return out.split([len(seqs[i][0]) for i in group])

    alone = [packed([i])[0] for i in range(len(seqs))]
    for group in ([2, 0], [3, 1, 0, 2]):
        for i, out in zip(group, packed(group)):
            _equal(out, alone[i], f"CUDA varlen: sequence {i} packed as {group}")
