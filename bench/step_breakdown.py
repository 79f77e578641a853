"""Where the time of one step goes, per op (torch.profiler, CPU).

    python bench/step_breakdown.py decode  [--dtype bfloat16] [--batch 1] [--packed]
    python bench/step_breakdown.py train   [--dtype float32]

decode: a LLaMA with TinyLlama-1.1B's shapes (22 layers, width 2048, 32
heads, 4 KV heads, MLP 5632, vocabulary 32000; random weights) after a
128-token prompt: the ops of one decode step of ``generate``'s loop (median
of 8 profiled steps), with the GB/s of the weights the step streams;
``--packed``: after ``model.pack_for_inference()``.
train: GPT-2 small (B=4, S=512): one forward + backward + AdamW step.

Prints a table: op, calls, total ms, share of the step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile


def _table(prof, steps: int, total_ms: float, top: int = 14) -> str:
    rows = [(e.key, e.count // steps, e.self_cpu_time_total / 1e3 / steps)
            for e in prof.key_averages()]
    rows = [r for r in rows if r[2] > 0.005 * total_ms]
    rows.sort(key=lambda r: -r[2])
    lines = [f"{'op':<44} {'calls':>6} {'ms':>9} {'share':>7}"]
    for name, calls, ms in rows[:top]:
        lines.append(f"{name[:44]:<44} {calls:>6} {ms:>9.2f} {100 * ms / total_ms:>6.1f}%")
    return "\n".join(lines)


def decode(dtype, batch: int, packed: bool = False):
    from pyllm.benchmark.models import _llama_pair

    hf, model = _llama_pair(dtype, "cpu")
    del hf
    if packed:
        model.pack_for_inference()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, 32000, (batch, 128), generator=torch.Generator().manual_seed(1))
    caches = model.new_caches(batch, 128 + 64)
    with torch.no_grad():
        logits = model(ids, None, caches, last_only=True)
        token = logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for _ in range(8):  # warm-up and plain timing
            start = time.perf_counter()
            token = model(token, None, caches, last_only=True)[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - start)
        step_ms = statistics.median(times) * 1e3
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(8):
                token = model(token, None, caches, last_only=True)[:, -1].argmax(-1, keepdim=True)
    print(f"decode step, LLaMA 1.1B shapes, {dtype}{', packed' if packed else ''}, batch {batch}: "
          f"{step_ms:.1f} ms "
          f"({batch * 1e3 / step_ms:.1f} tokens/s; weights {weights / 1e9:.2f} GB streamed at "
          f"{weights / step_ms / 1e6:.1f} GB/s)")
    print(_table(prof, 8, step_ms))


def train(dtype):
    import transformers

    from pyllm.models import GPT2LMHeadModel, causal_lm_loss

    torch.manual_seed(0)
    model = GPT2LMHeadModel.from_hf(transformers.GPT2LMHeadModel(transformers.GPT2Config())).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 50257, (4, 512), generator=torch.Generator().manual_seed(1))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def step():
        with autocast:
            loss = causal_lm_loss(model(ids), ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    step_ms = statistics.median(times) * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(f"training step, GPT-2 small B=4 S=512, {'bf16 autocast' if dtype == torch.bfloat16 else dtype}:"
          f" {step_ms:.0f} ms")
    print(_table(prof, 1, step_ms))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["decode", "train"])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--packed", action="store_true",
                        help="decode: pack the weights for inference first")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    decode(dtype, args.batch, args.packed) if args.what == "decode" else train(dtype)


if __name__ == "__main__":
    main()
