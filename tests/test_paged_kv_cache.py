"""pyllm.nn.PagedKVCache with pyllm.nn.Attention: three sequences of
different lengths prefilled packed (cu_seqlens) and decoded token by token
through pages give each sequence's outputs of the cache-free forward, with
rotary (the rotation fused into the append), GQA, a sliding window, a
softcap, ALiBi and sinks; pages are taken as sequences grow and given back;
errors name what is wrong."""

import pytest
import torch

import pyllm
from pyllm.nn import Attention, PagedKVCache

VARIANTS = {
    "rotary": dict(rope_base=10000.0),
    "window-softcap": dict(rope_base=500.0, window_size=(6, 0), softcap=2.0),
    "alibi-sinks": dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625]), sinks=True),
}


@pytest.mark.parametrize("backend", ("cpu", "reference"))
@pytest.mark.parametrize("page_size", [16, 3])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_and_decode_match_the_full_forward(variant, page_size, backend):
    torch.manual_seed(0)
    attn = Attention(32, 4, 2, **VARIANTS[variant]).eval()
    if attn.sinks is not None:
        torch.nn.init.normal_(attn.sinks)
    lengths, steps = [7, 1, 12], 4
    full = torch.randn(3, max(lengths) + steps, 32)
    cache = attn.new_paged_cache(3, max(lengths) + steps, page_size=page_size)
    with torch.no_grad(), pyllm.use_backend(backend):
        x = torch.cat([full[s, :n] for s, n in enumerate(lengths)])[None]
        cu = torch.tensor([0, 7, 8, 20], dtype=torch.int32)
        outs = [list(o) for o in attn(x, cache=cache, cu_seqlens=cu)[0].split(lengths)]
        for t in range(steps):
            step = torch.stack([full[s, n + t] for s, n in enumerate(lengths)])[:, None]
            for s, o in enumerate(attn(step, cache=cache)[:, 0]):
                outs[s].append(o)
        for s, n in enumerate(lengths):
            expected = attn(full[s, :n + steps][None])[0]
            torch.testing.assert_close(torch.stack(outs[s]), expected, rtol=1e-4, atol=1e-5)
    assert cache.lengths == [n + steps for n in lengths]
    assert int(cache.seqlens.sum()) == sum(lengths) + 3 * steps


def test_pages_are_taken_as_sequences_grow_and_given_back():
    cache = PagedKVCache(2, 40, 1, 8, page_size=16, num_pages=4)
    k = torch.randn(40, 1, 8)
    cache.append(k[:20], k[:20], [17, 3])
    assert cache.block_table[0, :2].tolist() == [0, 1] and cache.block_table[1, 0] == 2
    cache.append(k[:2], k[:2], [0, 2])  # one more page only when a page fills
    with pytest.raises(RuntimeError, match=r"out of pages .* 2 more wanted, 1 free"):
        cache.append(k[:30], k[:30], [0, 30])
    assert cache.lengths == [17, 5] and cache._free == [3]  # nothing taken by the failed call
    cache.release(0)
    assert cache.lengths == [0, 5] and int(cache.seqlens[0]) == 0
    cache.append(k[:30], k[:30], [0, 30])  # the released pages serve sequence 1 now
    assert cache.lengths == [0, 35] and cache.block_table[1, :3].tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match=r"sequence 1 would hold 41 tokens, more than max_tokens"):
        cache.append(k[:6], k[:6], [0, 6])
    with pytest.raises(ValueError, match=r"counts must have one entry per sequence \(2\)"):
        cache.append(k[:2], k[:2], [2])


def test_attention_refuses_what_pages_cannot_take():
    attn = Attention(32, 4, 2, rope_base=10000.0)
    cache = attn.new_paged_cache(2, 8)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        with pytest.raises(ValueError, match="pass no mask"):
            attn(x, cache=cache, mask=torch.ones(2, 1, 1, 3, dtype=torch.bool))
        with pytest.raises(ValueError, match="the cache holds 2 sequences, the call gives 3"):
            attn(torch.randn(3, 1, 32), cache=cache)
        with pytest.raises(ValueError, match=r"cu_seqlens must rise from 0 to the 6 tokens"):
            attn(x.reshape(1, 6, 32), cache=cache, cu_seqlens=torch.tensor([0, 2, 5]))
        with pytest.raises(ValueError, match="serves self-attention only"):
            attn(x, torch.randn(2, 3, 32), cache=cache)
    with pytest.raises(ValueError, match="cu_seqlens .* needs a PagedKVCache"):
        attn(x.reshape(1, 6, 32), cu_seqlens=torch.tensor([0, 3, 6]))
    with pytest.raises(ValueError, match="no gradient through a paged KV cache"):
        attn(x, cache=cache)  # parameters require grad and grad mode is on
