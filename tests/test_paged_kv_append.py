"""pyllm.paged_kv_append (new keys and values into their slots of a paged KV
cache, rotary embedding on the way) on the CPU kernel, the reference backend
and the CUDA kernel run on the host ("cuda-host": csrc/cuda/paged_kv_kernel.cu
through the CUDA execution model of tests/cuda_host/, every buffer guarded);
the Triton kernel runs these tests in the interpreter
(tests/interpreter/test_triton_paged_kv_append.py). Values are copied
exactly; rotated keys against the float64 rotation under the harness rule
(PyTorch's own answer: transformers' composition in the dtype); every row
that no slot names keeps its poison; slots < 0 write nothing; the appended
cache read back by pyllm.attention_paged equals attention over the rotated
keys."""

import ctypes

import pytest
import torch

import pyllm
from cuda_host_kernels import DTYPE_CODE, Guarded, check_launch, library
from harness import KERNEL_DTYPES, check_rule, generator, randn
from pyllm import reference
from test_attention_paged import cumulative, paged
from test_rotary import pytorch_rotary

CPU_BACKENDS = ("cpu", "reference", "cuda-host")
# (tokens, heads_kv, head_dim, rotary_dim (0: none), pages, page_size)
CASES = [(1, 1, 8, 0, 2, 16), (7, 2, 64, 64, 4, 16), (13, 3, 80, 32, 3, 7),
         (40, 8, 128, 96, 3, 32), (5, 2, 30, 30, 2, 5)]


def _rows(t):
    """(page, row, head) strides and rows per page, as the kernels take them."""
    if t.dim() == 4:
        return [t.stride(0), t.stride(1), t.stride(2), t.shape[1]]
    return [0, t.stride(0), t.stride(1), max(1, t.shape[0])]


def host_append(k_pages, v_pages, k, v, slots, cos, sin, positions, interleaved):
    """The CUDA kernel on the host, as csrc/cuda/paged_kv.cpp launches it (the
    pages copied into guarded buffers and back)."""
    g = [Guarded(t, fill=t) for t in (k, v, k_pages, v_pages, slots)]
    rows = (ctypes.c_int64 * 16)(*[s for t in g[:4] for s in _rows(t.tensor)])
    rotary = cos is not None
    tables = [Guarded(t, fill=t) for t in (cos, sin, positions)] if rotary else [None] * 3
    sizes = (ctypes.c_int64 * 5)(k.shape[0], k.shape[1], k.shape[2],
                                 cos.shape[1] if rotary else 0, cos.shape[0] if rotary else 0)
    ptr = lambda x: ctypes.c_void_p(x.tensor.data_ptr() if x is not None else 0)  # noqa: E731
    check_launch(library().host_paged_kv_append(
        *(ptr(x) for x in g[:4]), rows, ptr(g[4]), *(ptr(x) for x in tables), sizes,
        DTYPE_CODE[k.dtype], int(interleaved)), "paged kv append")
    for name, x in zip(("k", "v", "k_pages", "v_pages", "slots"), g):
        x.check(name)
    k_pages.copy_(g[2].tensor)
    v_pages.copy_(g[3].tensor)


def append(backend, *args, **kw):
    if backend != "cuda-host":
        return pyllm.paged_kv_append(*args, backend=backend, **kw)
    from pyllm.ops import paged_kv as face

    route = face._backend.route
    face._backend.route = lambda op, t, b: host_append if op == "paged_kv_append" else route(
        op, t, "cpu")
    try:
        return pyllm.paged_kv_append(*args, **kw)
    finally:
        face._backend.route = route


def make(case, dtype, key):
    tokens, hkv, d, rd, pages, page = case
    gen = generator("paged append", case, dtype, key)
    k = randn((tokens + 2, hkv, d), dtype, gen=gen)[1:-1]  # not at the start of its storage
    v = randn((tokens, 2 * hkv, d), dtype, gen=gen)[:, ::2]  # strided heads
    # distinct slots, some of them -1 (padding)
    slots = torch.randperm(pages * page, generator=gen)[:tokens]
    slots[torch.rand(tokens, generator=gen) < 0.2] = -1
    positions = torch.randint(0, 300, (tokens,), generator=gen)
    cos, sin = pyllm.rotary_tables(rd, 300, 500.0) if rd else (None, None)
    k_pages = torch.full((pages, page, 2 * hkv, d), float("nan"), dtype=dtype)[:, :, 1::2]
    v_pages = torch.full((pages, page, hkv, d), float("nan"), dtype=dtype)
    return k, v, slots, positions, cos, sin, k_pages, v_pages


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_append(case, dtype, interleaved, backend):
    k, v, slots, positions, cos, sin, k_pages, v_pages = make(case, dtype, interleaved)
    rotary = cos is not None
    k_before = k.clone()
    kw = dict(cos=cos, sin=sin, positions=positions, interleaved=interleaved) if rotary else {}
    append(backend, k_pages, v_pages, k, v, slots, **kw)
    assert torch.equal(k, k_before), "k itself must not change"
    page_size = k_pages.shape[1]
    written = torch.zeros(k_pages.shape[:2], dtype=torch.bool)
    keep = slots >= 0
    page, row = slots[keep] // page_size, slots[keep] % page_size
    written[page, row] = True
    assert torch.isnan(k_pages[~written]).all() and torch.isnan(v_pages[~written]).all(), \
        "a row no slot names was written"
    assert torch.equal(v_pages[page, row], v[keep])
    ours = k_pages[page, row]
    if not rotary:
        assert torch.equal(ours, k[keep])
        return
    truth = reference.rotary(k[keep][None].double(), cos, sin, positions[keep][None],
                             interleaved=interleaved)[0]
    theirs = pytorch_rotary(k[keep][None], cos, sin, positions[keep][None], interleaved)[0]
    check_rule(ours, truth, theirs)


@pytest.mark.parametrize("backend", ("cpu", "reference"))
def test_q_rotated_and_read_back_by_attention(backend):
    """Decode two steps of three sequences of different lengths: the new q/k
    rotated by the append, the cache read by attention_paged; the same as
    attention over the keys rotated by pyllm.rotary, kept contiguous."""
    heads, hkv, d, page = 4, 2, 32, 16
    gen = generator("paged append attention", backend)
    lengths = [5, 40, 17]
    cos, sin = pyllm.rotary_tables(d, 128, 10000.0)
    k_old = randn((sum(lengths), hkv, d), torch.float32, gen=gen)
    v_old = randn((sum(lengths), hkv, d), torch.float32, gen=gen)
    k_pages, v_pages, table = paged(k_old, v_old, lengths, page, "append", strided=False)
    # room for the new tokens: one more page per sequence
    extra = torch.arange(k_pages.shape[0], k_pages.shape[0] + 3, dtype=torch.int32)
    k_pages = torch.cat([k_pages, torch.zeros(3, *k_pages.shape[1:])])
    v_pages = torch.cat([v_pages, torch.zeros(3, *v_pages.shape[1:])])
    table = torch.cat([table, extra[:, None]], 1)
    for s, n in enumerate(lengths):  # the extra page right after the sequence's last
        used = (n + page - 1) // page
        table[s, used], table[s, -1] = extra[s], table[s, used]
    keys = [k_old[c:c + n] for c, n in zip(cumulative(lengths)[:-1], lengths)]
    values = [v_old[c:c + n] for c, n in zip(cumulative(lengths)[:-1], lengths)]
    for step in range(2):
        q = randn((3, 1, heads, d), torch.float32, gen=gen)
        k = randn((3, 1, hkv, d), torch.float32, gen=gen)
        v = randn((3, 1, hkv, d), torch.float32, gen=gen)
        position = torch.tensor(lengths)
        slots = pyllm.paged_slots(table, page, torch.arange(3), position)
        q_rot, k_rot = pyllm.rotary(q.clone(), k.clone(), cos, sin, position[:, None],
                                    backend=backend)
        pyllm.paged_kv_append(k_pages, v_pages, k, v, slots, q=q, cos=cos, sin=sin,
                              positions=position[:, None], backend=backend)
        assert torch.equal(q, q_rot)
        lengths = [n + 1 for n in lengths]
        keys = [torch.cat([x, k_rot[s, 0][None]]) for s, x in enumerate(keys)]
        values = [torch.cat([x, v[s, 0][None]]) for s, x in enumerate(values)]
        out = pyllm.attention_paged(q, k_pages, v_pages, table,
                                    torch.tensor(lengths, dtype=torch.int32), causal=True,
                                    backend=backend)
        expected = pyllm.attention_varlen(q[:, 0], torch.cat(keys), torch.cat(values),
                                          cumulative([1, 1, 1]), cumulative(lengths),
                                          causal=True, backend=backend)
        torch.testing.assert_close(out[:, 0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ("cpu", "reference"))
def test_bad_input(backend):
    op = "pyllm.paged_kv_append"
    k_pages = torch.zeros(2, 16, 2, 8)
    k = torch.randn(3, 2, 8)
    slots = torch.tensor([0, 5, 31])
    cos, sin = pyllm.rotary_tables(8, 10)

    def call(**over):
        args = dict(k_pages=k_pages, v_pages=k_pages.clone(), k=k, v=k, slots=slots)
        args.update(over)
        return pyllm.paged_kv_append(args.pop("k_pages"), args.pop("v_pages"), args.pop("k"),
                                     args.pop("v"), args.pop("slots"), backend=backend, **args)

    call()
    with pytest.raises(ValueError, match=rf"{op}: slots\[2\] = 32 is past the cache's pages x "
                                         r"page_size = 32 rows"):
        call(slots=torch.tensor([0, 5, 32]))
    with pytest.raises(ValueError, match=rf"{op}: slots must have shape \(3,\)"):
        call(slots=slots[:2])
    with pytest.raises(TypeError, match=rf"{op}: slots"):
        call(slots=slots.float())
    with pytest.raises(TypeError, match=rf"{op}: v must have the pages' dtype"):
        call(v=k.double())
    with pytest.raises(ValueError, match=rf"{op}: k's \(heads_kv, head_dim\) must be the pages'"):
        call(k=torch.randn(3, 1, 8), v=torch.randn(3, 1, 8))
    with pytest.raises(ValueError, match=rf"{op}: rotary needs cos, sin and positions together"):
        call(cos=cos)
    with pytest.raises(ValueError, match=rf"{op}: positions must lie in \[0, 10\)"):
        call(cos=cos, sin=sin, positions=torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match=rf"{op}: q is only rotated"):
        call(q=torch.randn(3, 4, 8))
    with pytest.raises(ValueError, match=rf"{op}: v_pages must match k_pages"):
        call(v_pages=torch.zeros(2, 8, 2, 8))
