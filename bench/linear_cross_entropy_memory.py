"""Peak extra memory of one loss step (forward + backward) of the LM head and
cross-entropy: pyllm.linear_cross_entropy against the unfused F.linear +
F.cross_entropy, each measured the same way in a fresh process: the peak
resident set during the step (VmHWM, its high-water mark reset once the
inputs and weights are allocated) minus the resident set before it (the
gradients, which both must produce, are counted in both).

    .venv/bin/python bench/linear_cross_entropy_memory.py [--rows 8192 --hidden 2048
        --vocab 128256 --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time
import torch, torch.nn.functional as F
import pyllm
rows, hidden, vocab, dtype, which = json.loads(sys.argv[1])
dtype = getattr(torch, dtype)
g = torch.Generator().manual_seed(0)
h = torch.randn(rows, hidden, generator=g, dtype=dtype).requires_grad_()
w = torch.randn(vocab, hidden, generator=g, dtype=dtype).mul_(hidden ** -0.5).requires_grad_()
t = torch.randint(0, vocab, (rows,), generator=g)

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the high-water mark restarts from the resident set now
before = status("VmRSS")
start = time.perf_counter()
if which == "fused":
    loss = pyllm.linear_cross_entropy(h, w, t)
else:
    loss = F.cross_entropy(F.linear(h, w), t)
loss.backward()
seconds = time.perf_counter() - start
peak = status("VmHWM")
print(json.dumps({"which": which, "peak_extra_bytes": peak - before, "seconds": seconds,
                  "loss": float(loss)}))
"""


def measure(rows, hidden, vocab, dtype, which) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([rows, hidden, vocab, dtype,
                                                                   which])],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    results = [measure(args.rows, args.hidden, args.vocab, args.dtype, which)
               for which in ("unfused", "fused")]
    for r in results:
        print(f"{r['which']:8s} peak extra {r['peak_extra_bytes'] / 2**30:6.2f} GiB  "
              f"{r['seconds']:7.2f} s  loss {r['loss']:.4f}")
    ratio = results[1]["peak_extra_bytes"] / max(results[0]["peak_extra_bytes"], 1)
    print(f"fused / unfused peak extra memory: {ratio:.3f} (goal <= 0.125); speed "
          f"{results[0]['seconds'] / results[1]['seconds']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
