"""Decode tokens/s of the bench's 1.1B LLaMA in pyllm (packed weights) and in
llama.cpp, interleaved: one pyllm run, one ``llama-bench`` run, and again.

    python bench/vs_llama_cpp.py LLAMA_BENCH MODEL.gguf [--dtype bfloat16] [--rounds 6]

``MODEL.gguf``: the same model converted for llama.cpp (see
``bench/llama_cpp_model.py``: the same random weights and shapes, in the same
dtype); ``LLAMA_BENCH``: llama.cpp's ``llama-bench`` binary. Each round
times 64 greedy decode steps in pyllm after a 128-token prompt, then
``llama-bench -t <threads> -p 0 -n 64 -r 1`` (its ``tg64``), so that both see
the same state of the machine: on a VM whose memory bandwidth drifts by a
third between minutes, separate runs of the two are not comparable. Prints
each round and the medians; the ratio is pyllm / llama.cpp.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import time

import torch


def pyllm_decode_rate(model, steps: int = 64, prompt: int = 128) -> float:
    """Tokens/s of ``steps`` greedy decode steps after a ``prompt``-token prompt."""
    ids = torch.randint(0, model.config.vocab_size, (1, prompt),
                        generator=torch.Generator().manual_seed(1))
    caches = model.new_caches(1, prompt + steps + 1)
    with torch.no_grad():
        token = model(ids, None, caches, last_only=True)[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(steps):
            token = model(token, None, caches, last_only=True)[:, -1].argmax(-1, keepdim=True)
        return steps / (time.perf_counter() - start)


def llama_cpp_decode_rate(llama_bench: str, gguf: str, threads: int) -> float:
    """llama-bench's ``tg64`` tokens/s (one repetition after its warm-up)."""
    out = subprocess.run([llama_bench, "-m", gguf, "-t", str(threads), "-p", "0", "-n", "64",
                          "-r", "1"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"tg64\s*\|\s*([\d.]+)", out)
    if match is None:
        raise RuntimeError(f"no tg64 row in llama-bench's output:\n{out}")
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("llama_bench")
    parser.add_argument("gguf")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    from pyllm.benchmark.models import _llama_pair

    hf, model = _llama_pair(getattr(torch, args.dtype), "cpu")
    del hf
    model.pack_for_inference()
    threads = torch.get_num_threads()
    pyllm_decode_rate(model, steps=8)  # warm-up
    ours, theirs = [], []
    for r in range(args.rounds):
        ours.append(pyllm_decode_rate(model))
        theirs.append(llama_cpp_decode_rate(args.llama_bench, args.gguf, threads))
        print(f"round {r + 1}: pyllm {ours[-1]:.2f}  llama.cpp {theirs[-1]:.2f} tokens/s "
              f"({ours[-1] / theirs[-1]:.2f}x)", flush=True)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"{args.dtype} decode, {threads} threads, median of {args.rounds}: pyllm {a:.2f}, "
          f"llama.cpp {b:.2f} tokens/s: {a / b:.2f}x")


if __name__ == "__main__":
    main()
