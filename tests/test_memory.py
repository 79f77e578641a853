"""The CPU output cache (pyllm.memory): large outputs are reused, capped,
released by empty_cache, and behave as ordinary tensors."""

import torch

import pyllm
from harness import run_python


def test_large_outputs_are_reused_and_released():
    pyllm.empty_cache()
    x = torch.randn(1024, 1024)  # 4 MiB outputs
    y = pyllm.rms_norm(x)
    address = y.data_ptr()
    del y
    assert pyllm.cached_bytes() >= 4 * 2**20
    y = pyllm.rms_norm(x)
    assert y.data_ptr() == address  # the freed output came back
    del y
    assert pyllm.empty_cache() >= 4 * 2**20
    assert pyllm.cached_bytes() == 0


def test_small_outputs_bypass_the_cache():
    pyllm.empty_cache()
    y = pyllm.rms_norm(torch.randn(4, 64))
    del y
    assert pyllm.cached_bytes() == 0


def test_cached_outputs_are_ordinary_tensors():
    y = pyllm.rms_norm(torch.randn(1024, 1024))
    y.resize_(2048, 2048)  # resizable, through the same allocator
    y.fill_(1.0)
    assert float(y.sum()) == 2048 * 2048
    z = y.clone()
    del y
    assert float(z.sum()) == 2048 * 2048


def test_a_cached_block_serves_a_slightly_smaller_output():
    """Outputs of varying sizes share blocks (at most a quarter to spare)
    instead of each size leaving its own block behind."""
    pyllm.empty_cache()
    y = pyllm.rms_norm(torch.randn(1024, 1024))  # 4 MiB
    address = y.data_ptr()
    del y
    y = pyllm.rms_norm(torch.randn(900, 1024))  # 3.5 MiB: fits the 4 MiB block
    assert y.data_ptr() == address
    del y
    y = pyllm.rms_norm(torch.randn(400, 1024))  # 1.6 MiB: too small for it
    assert y.data_ptr() != address
    del y
    pyllm.empty_cache()


CAPPED = """
import random, torch, pyllm
cap = 16 * 2**20
random.seed(0)
kept = []
for i in range(400):
    rows = random.randint(256, 3000)  # outputs of 1 to 12 MiB, hundreds of sizes
    kept.append(pyllm.rms_norm(torch.randn(rows, 1024)))
    if len(kept) > 3:
        kept.pop(random.randrange(len(kept)))
    assert pyllm.cached_bytes() <= cap, pyllm.cached_bytes()
print(pyllm.cached_bytes())
"""


def test_the_cache_stays_under_its_cap_with_mixed_sizes():
    result = run_python(CAPPED, env={"PYLLM_CPU_CACHE_MB": "16"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert 0 < int(result.stdout.split()[-1]) <= 16 * 2**20


# 10,000 calls of every op (forward, and backward every tenth), shapes drawn
# at random (outputs from a few bytes to a few MiB, every dtype), after a
# warm-up at the largest shapes (thread-local workspaces grow to them once).
RSS = """
import random, resource, time, torch, pyllm
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
random.seed(1)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Inputs are views of random pools (drawing fresh random numbers would cost
# more than the calls); outputs are the ops' own, fresh each call.
POOL = {dt: torch.randn(600 * 2048, dtype=dt) for dt in DTYPES}
def randn(*shape, dtype, requires_grad=False):
    n = 1
    for s in shape:
        n *= s
    start = random.randint(0, POOL[dtype].numel() - n)
    return POOL[dtype][start:start + n].view(shape).detach().requires_grad_(requires_grad)
def call(op, big=False):
    dt = random.choice(DTYPES)
    grad = random.random() < 0.1
    r = (lambda lo, hi: hi) if big else random.randint
    if op in ("rms_norm", "layer_norm"):
        x = randn(r(1, 600), r(1, 2048), dtype=dt, requires_grad=grad)
        y = getattr(pyllm, op)(x)
    elif op in ("add_rms_norm", "add_layer_norm"):
        x = randn(r(1, 600), r(1, 2048), dtype=dt, requires_grad=grad)
        y = getattr(pyllm, op)(x, randn(*x.shape, dtype=dt))[0]
    elif op == "linear":
        x = randn(r(1, 300), r(1, 300), dtype=dt, requires_grad=grad)
        y = pyllm.linear(x, randn(r(1, 900), x.shape[1], dtype=dt), None, "gelu")
    elif op == "swiglu":
        x = randn(r(1, 300), r(1, 300), dtype=dt, requires_grad=grad)
        n = r(1, 600)
        y = pyllm.swiglu(x, randn(n, x.shape[1], dtype=dt), randn(n, x.shape[1], dtype=dt))
    else:
        b, sq, sk, h, d = r(1, 2), r(1, 96), r(1, 128), r(1, 4), random.choice((16, 64, 128))
        q = randn(b, sq, h, d, dtype=dt, requires_grad=grad)
        kv = randn(b, sk, h, d, dtype=dt)
        y = pyllm.attention(q, kv, kv, causal=random.random() < 0.5)
    if grad:
        y.sum().backward()
OPS = ("rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm", "linear", "swiglu", "attention")
for op in OPS:
    for _ in range(3):
        call(op, big=True)
for op in OPS:
    for _ in range(200):
        call(op)
before = rss()
started = time.time()
for op in OPS:
    for _ in range(CALLS):
        call(op)
after = rss()
print(len(OPS) * CALLS, before, after, pyllm.cached_bytes(), round(time.time() - started, 1))
"""


def test_rss_stays_bounded_over_ten_thousand_calls_of_every_op():
    cap_mb = 64
    result = run_python("CALLS = 10000\n" + RSS, env={"PYLLM_CPU_CACHE_MB": str(cap_mb)},
                        timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    calls, before, after, cached, seconds = result.stdout.split()[-5:]
    growth = int(after) - int(before)
    print(f"{calls} calls in {seconds} s: RSS {int(before) >> 20} -> {int(after) >> 20} MiB, "
          f"cache {int(cached) >> 20} MiB")
    assert int(cached) <= cap_mb << 20
    # the cache's cap, and 32 MiB for malloc's own heap and arenas
    assert growth <= (cap_mb + 32) << 20, f"RSS grew by {growth >> 20} MiB"


def test_four_threads_give_the_results_of_one():
    import random
    import threading

    random.seed(2)
    calls = []
    for i in range(24):
        dt = (torch.float32, torch.bfloat16, torch.float16)[i % 3]
        g = torch.Generator().manual_seed(i)
        kind = i % 4
        if kind == 0:
            x = torch.randn(random.randint(1, 300), random.randint(1, 1500), generator=g).to(dt)
            calls.append(lambda x=x: pyllm.rms_norm(x))
        elif kind == 1:
            x = torch.randn(random.randint(1, 300), random.randint(1, 1500), generator=g).to(dt)
            calls.append(lambda x=x: pyllm.add_layer_norm(x, x.flip(0))[0])
        elif kind == 2:
            x = torch.randn(random.randint(1, 200), 96, generator=g).to(dt)
            w = torch.randn(random.randint(1, 400), 96, generator=g).to(dt)
            calls.append(lambda x=x, w=w: pyllm.linear(x, w, None, "silu"))
        else:
            q = torch.randn(1, random.randint(1, 80), 4, 64, generator=g).to(dt)
            kv = torch.randn(1, random.randint(1, 120), 2, 64, generator=g).to(dt)
            calls.append(lambda q=q, kv=kv: pyllm.attention(q, kv, kv, causal=True))
    expected = [c() for c in calls]
    results, errors = {}, []

    def worker(t):
        try:
            for rep in range(3):
                order = list(range(len(calls)))
                random.Random(t * 10 + rep).shuffle(order)
                for i in order:
                    results[(t, rep, i)] = calls[i]()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 4 * 3 * len(calls)
    for (t, rep, i), got in results.items():
        assert torch.equal(got, expected[i]), (t, rep, i)
