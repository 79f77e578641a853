"""Attention over a paged KV cache (pyllm.attention_paged, the block_table of
pyllm::attention): decode and chunked prefill for sequences of different
lengths, pages in shuffled order with never-used pages full of NaN between
them, page sizes that are and are not multiples of 16, pages that are a
strided view, GQA/MQA, with causal, a sliding window, a softcap, ALiBi and
sinks, against the float64 reference on the gathered keys under the harness
rule (PyTorch's own answer: its composition in the dtype under test on the
gathered keys), on the CPU kernel, the reference backend and the CUDA kernels
run on the host; the Triton kernels run these tests in the interpreter
(tests/interpreter/test_triton_attention_paged.py). Bad tables and lengths
give clear errors."""

import pytest
import torch

import pyllm
from harness import KERNEL_DTYPES, check_rule, generator, poisoned_outputs, randn
from pyllm import reference
from test_attention import check_lse, cumulative
from test_attention_alibi import composed
from test_attention_variants import GPU_DTYPES, HOST

CPU_BACKENDS = ("cpu", "reference")
# (query counts, key counts, heads, heads_kv, head_dim, page_size)
CASES = [
    ([1, 1, 1, 1], [1, 37, 300, 129], 4, 2, 64, 16),      # decode, GQA, a one-key sequence
    ([1, 1], [600, 5], 4, 1, 128, 256),                   # decode, MQA, big pages
    ([37, 1, 0, 12], [100, 17, 5, 12], 2, 2, 40, 32),     # chunked prefill, an idle sequence
    ([70, 9], [70, 300], 4, 4, 32, 7),                    # pages of 7 (not a multiple of 16)
]
# (causal, window_size, softcap, ALiBi)
VARIANTS = {
    "plain": (False, (-1, -1), 0.0, False),
    "causal": (True, (-1, -1), 0.0, False),
    "sliding": (True, (16, 0), 0.0, False),
    "all": (True, (23, 0), 3.0, True),
}


def paged(k, v, lengths, page_size, *key, strided=True):
    """(k_pages, v_pages, block_table) holding the packed (tokens, heads_kv,
    head_dim) k and v: each sequence's pages in a shuffled order, two unused
    pages of NaN among them, table entries past a sequence's pages -1; with
    `strided`, the pages are every other head of a larger tensor."""
    gen = generator("pages", lengths, page_size, *key)
    counts = [(n + page_size - 1) // page_size for n in lengths]
    total = sum(counts) + 2
    order = torch.randperm(total, generator=gen)
    hkv, d = k.shape[1], k.shape[2]
    shape = (total, page_size, 2 * hkv if strided else hkv, d)
    k_pages = torch.full(shape, float("nan"), dtype=k.dtype)
    v_pages = torch.full(shape, float("nan"), dtype=k.dtype)
    if strided:
        k_pages, v_pages = k_pages[:, :, ::2], v_pages[:, :, ::2]
    table = torch.full((len(lengths), max(counts, default=0) + 1), -1, dtype=torch.int32)
    used, first = 0, 0
    for s, (n, c) in enumerate(zip(lengths, counts)):
        table[s, :c] = order[used:used + c].int()
        for i in range(n):
            page, row = int(table[s, i // page_size]), i % page_size
            k_pages[page, row] = k[first + i]
            v_pages[page, row] = v[first + i]
        used, first = used + c, first + n
    return k_pages, v_pages, table


def make(case, dtype, *key):
    lq, lk, h, hkv, d, page = case
    gen = generator("paged attention", case, dtype, *key)
    q = randn((sum(lq), h, d), dtype, gen=gen)
    k = randn((sum(lk), hkv, d), dtype, gen=gen)
    v = randn((sum(lk), hkv, d), dtype, gen=gen)
    return q, k, v, paged(k, v, lk, page, dtype, *key)


def slopes_of(heads, *key):
    return randn((heads,), torch.float32, gen=generator("paged slopes", heads, *key), scale=0.1,
                 offset=0.2).abs()


def per_sequence_composed(q, k, v, lq, lk, alibi, causal, window_size, softcap):
    """PyTorch's composition (in q's dtype) per sequence, packed back."""
    heads = q.shape[1]
    slopes = alibi if alibi is not None else torch.zeros(heads)
    outs = []
    cq, ck = cumulative(lq), cumulative(lk)
    for s in range(len(lq)):
        qs, ks, vs = q[cq[s]:cq[s + 1]][None], k[ck[s]:ck[s + 1]][None], v[ck[s]:ck[s + 1]][None]
        outs.append(composed(qs, ks, vs, slopes, causal=causal, window_size=window_size,
                             softcap=softcap)[0])
    return torch.cat(outs)


def run(backend, q, k_pages, v_pages, table, lq, lk, **kw):
    if backend == HOST:
        from test_cuda_host_attention import HostAttention

        call = HostAttention(q, k_pages, v_pages, cu_q=cumulative(lq), cu_k=cumulative(lk),
                             block_table=table, causal=kw.get("causal", False),
                             window_size=kw.get("window_size", (-1, -1)),
                             softcap=kw.get("softcap", 0.0), alibi_slopes=kw.get("alibi_slopes"))
        return call.forward()
    with poisoned_outputs():
        return pyllm.attention_paged(q, k_pages, v_pages, table,
                                     torch.tensor(lk, dtype=torch.int32),
                                     cu_seqlens_q=cumulative(lq), return_lse=True,
                                     backend=backend, **kw)


BACKEND_DTYPES = [(b, d) for b in CPU_BACKENDS for d in KERNEL_DTYPES] + \
    [(HOST, d) for d in GPU_DTYPES]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward(case, variant, dtype, backend):
    lq, lk, h = case[0], case[1], case[2]
    causal, window, cap, alibi = VARIANTS[variant]
    q, k, v, (k_pages, v_pages, table) = make(case, dtype, variant)
    slopes = slopes_of(h, case) if alibi else None
    kw = dict(causal=causal, window_size=window, softcap=cap, alibi_slopes=slopes)
    out, lse = run(backend, q, k_pages, v_pages, table, lq, lk, **kw)
    t_out, t_lse = reference.attention_varlen(q.double(), k.double(), v.double(), cumulative(lq),
                                              cumulative(lk), **kw)
    check_rule(out, t_out, per_sequence_composed(q, k, v, lq, lk, slopes, causal, window, cap))
    check_lse(lse, t_lse)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dense_queries_and_sinks(backend):
    """q (batch, seq_q, heads, head_dim): each sequence's seq_q queries are its
    last keys' (decode with 2 tokens at once); the same as the packed call;
    sinks join the softmax and get their gradient (the pages none)."""
    lk, h, hkv, d, page = [50, 300, 3], 4, 2, 64, 16
    gen = generator("paged dense")
    q = randn((3, 2, h, d), torch.float32, gen=gen)
    k = randn((sum(lk), hkv, d), torch.float32, gen=gen)
    v = randn((sum(lk), hkv, d), torch.float32, gen=gen)
    k_pages, v_pages, table = paged(k, v, lk, page, "dense")
    seqlens = torch.tensor(lk, dtype=torch.int32)
    sinks = randn((h,), torch.float32, gen=gen, offset=1.0).requires_grad_()
    out, lse = pyllm.attention_paged(q, k_pages, v_pages, table, seqlens, causal=True, sinks=sinks,
                                     return_lse=True, backend=backend)
    assert out.shape == q.shape and lse.shape == (3, h, 2)
    packed, packed_lse = pyllm.attention_paged(
        q.reshape(6, h, d), k_pages, v_pages, table, seqlens, cu_seqlens_q=cumulative([2, 2, 2]),
        causal=True, sinks=sinks, return_lse=True, backend=backend)
    assert torch.equal(out.reshape(6, h, d), packed)
    assert torch.equal(lse, packed_lse.view(h, 3, 2).permute(1, 0, 2))
    t_out, _ = reference.attention_varlen(q.reshape(6, h, d).double(), k.double(), v.double(),
                                          cumulative([2, 2, 2]), cumulative(lk), causal=True,
                                          sinks=sinks.detach().double())
    check_rule(out.reshape(6, h, d), t_out, t_out.float())
    grad = randn(out.shape, torch.float32, gen=gen)
    (ours,) = torch.autograd.grad(out, sinks, grad)
    s64 = sinks.detach().double().requires_grad_()
    t_out, _ = reference.attention_varlen(q.reshape(6, h, d).double(), k.double(), v.double(),
                                          cumulative([2, 2, 2]), cumulative(lk), causal=True,
                                          sinks=s64)
    (truth,) = torch.autograd.grad(t_out, s64, grad.reshape(6, h, d).double())
    torch.testing.assert_close(ours.double(), truth, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_input(backend):
    op = "pyllm.attention_paged"
    checked_by = r"(pyllm.attention_paged|pyllm::attention)"  # the C++ ops check pages themselves
    q = torch.randn(2, 1, 4, 16)
    k_pages = torch.randn(5, 16, 2, 16)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    seqlens = torch.tensor([20, 30], dtype=torch.int32)

    def call(**over):
        args = dict(q=q, k_pages=k_pages, v_pages=k_pages, block_table=table, seqlens_k=seqlens)
        args.update(over)
        return pyllm.attention_paged(args.pop("q"), args.pop("k_pages"), args.pop("v_pages"),
                                     args.pop("block_table"), args.pop("seqlens_k"),
                                     backend=backend, **args)

    call()
    # a strided table (every other column of a wider one) reads like its copy
    wide = torch.stack([table, torch.full_like(table, 99)], 2).flatten(1)[:, ::2]
    assert wide.stride(1) == 2 and torch.equal(call(block_table=wide), call())
    with pytest.raises(ValueError, match=rf"{checked_by}: block_table\[1, 1\] = 7 is not a page"):
        call(block_table=torch.tensor([[0, 1], [2, 7]], dtype=torch.int32))
    with pytest.raises(ValueError, match=rf"{checked_by}: block_table\[0, 0\] = -1 is not a page"):
        call(block_table=torch.tensor([[-1, 1], [2, 3]], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"sequence 1 has 33 keys, more than its 2 pages of 16"):
        call(seqlens_k=torch.tensor([20, 33], dtype=torch.int32))
    with pytest.raises(TypeError, match=rf"{op}: block_table"):
        call(block_table=table.long())
    with pytest.raises(ValueError, match=rf"{op}: seqlens_k must have one length per"):
        call(seqlens_k=seqlens[:1])
    with pytest.raises(ValueError, match=rf"{op}: seqlens_k must not be negative"):
        call(seqlens_k=torch.tensor([-1, 3], dtype=torch.int32))
    with pytest.raises(TypeError, match=rf"{op}: v_pages must have q's dtype"):
        call(v_pages=k_pages.double())
    with pytest.raises(ValueError, match=rf"{op}: the heads of the pages"):
        call(k_pages=torch.randn(5, 16, 3, 16), v_pages=torch.randn(5, 16, 3, 16))
    with pytest.raises(ValueError, match=rf"{op}: no gradient through a paged KV cache"):
        call(q=q.clone().requires_grad_())
    with pytest.raises(ValueError, match=rf"{op}: cu_seqlens_q must hold batch \+ 1 = 3"):
        call(q=q[:, 0], cu_seqlens_q=cumulative([1]))
    # the pages a sequence does not reach are never read: -1 there is fine
    call(block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
         seqlens_k=torch.tensor([16, 30], dtype=torch.int32))
    call(block_table=torch.tensor([[0, -1], [2, 3]], dtype=torch.int32),
         seqlens_k=torch.tensor([16, 30], dtype=torch.int32))


def test_the_op_checks_the_table_itself():
    """pyllm::attention with a block_table, called directly (no Python checks),
    refuses a page number out of range instead of reading it."""
    q = torch.randn(2, 4, 16)
    k_pages = torch.randn(5, 16, 2, 16)
    table = torch.tensor([[0, 9], [2, 3]], dtype=torch.int32)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)
    cu_k = torch.tensor([0, 20, 50], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"block_table\[0, 1\] = 9 is not a page"):
        torch.ops.pyllm.attention(q, k_pages, k_pages, cu, cu_k, 1, 30, None, 0.25, False,
                                  block_table=table)
    with pytest.raises(ValueError, match=r"a block_table needs cu_seqlens_q"):
        torch.ops.pyllm.attention(q[None], k_pages[:1], k_pages[:1], None, None, 2, 16, None, 0.25,
                                  False, block_table=table)
