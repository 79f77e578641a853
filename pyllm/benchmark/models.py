"""Model benchmarks (``pyllm bench --models``): a GPT-2-small-sized model
(12 layers, width 768, 12 heads, vocabulary 50257; random weights, seed 0)
in pyllm against the same weights in Hugging Face ``transformers``, in one run:

- prefill: the logits of every position for a (1, 512) prompt; pyllm vs
  ``transformers`` eager and ``torch.compile`` of it;
- generate: 128 greedy tokens after a 512-token prompt, batch 1 and 8; pyllm's
  ``generate`` vs ``transformers``' ``generate`` (eager), in tokens per second
  (new tokens over the whole call, prefill included).

Before timing, pyllm's prefill logits are checked against the float64 model
under the accuracy rule. Implementations are timed interleaved, ``repeats``
times, and the median is reported. Outputs are allocated by every call (as
both libraries do).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import statistics
import sys
import time

import torch

from pyllm.accuracy import judge

__all__ = ["run_models", "format_model_table"]

PROMPT, NEW_TOKENS = 512, 128


def _gpt2_pair(dtype: torch.dtype, device: str):
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the bench extra has it
        raise RuntimeError("pyllm bench --models needs transformers "
                           "(pip install 'pyllm[test]')") from e
    from pyllm.models import GPT2LMHeadModel

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval().to(device, dtype)
    return hf, GPT2LMHeadModel.from_hf(hf)


def _interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds per call of each function, called in turn ``repeats`` times."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _prefill_flops(config, tokens: int) -> float:
    """Multiply-adds x 2 of a forward over ``tokens`` positions (causal attention)."""
    width, layers = config.n_embd, config.n_layer
    matmul = layers * (4 * width * width + 2 * width * 4 * width) + width * config.vocab_size
    attention = layers * 2 * tokens * width  # QK^T and PV, half the square (causal)
    return 2.0 * tokens * (matmul + attention / 2)


def run_models(dtypes=("float32", "bfloat16"), batches=(1, 8), device="cpu", quick=False,
               repeats: int = 3, compile_baseline: bool = True, output_dir="bench-results",
               stream=sys.stdout, ceilings=None, model: str = "gpt2-small") -> list[dict]:
    """Runs the model benchmark; returns one row per (case, dtype,
    implementation) and prints the table. ``quick``: a 128-token prompt, 16
    new tokens, batch 1, one repeat, no compile baseline (a smoke run).
    ``model``: "gpt2-small" (prefill and generate), "llama-1.1b" (prefill and
    decode tokens/s, batch 1 and 8) or "gpt2-train" (a training step)."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    prompt, new = (128, 16) if quick else (PROMPT, NEW_TOKENS)
    if quick:
        batches, repeats, compile_baseline = (1,), 1, False
    if model != "gpt2-small":
        rows = (_llama_rows(dtypes, batches, device, quick, repeats) if model == "llama-1.1b"
                else _training_rows(dtypes, device, quick, repeats, compile_baseline))
        return _finish(rows, output_dir, stream)
    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        hf, ours = _gpt2_pair(dtype, device)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, hf.config.vocab_size, (1, prompt), generator=gen).to(device)
        with torch.no_grad():
            truth = _truth_logits(hf, ids)
            verdict = judge(ours(ids), truth, hf(ids).logits)
        base = {"model": "gpt2-small", "dtype": dtype_name, "device": device,
                "threads": torch.get_num_threads()}
        if not verdict.ok:
            rows.append({**base, "case": f"prefill B1 S{prompt}", "impl": "pyllm",
                         "status": "FAIL", "note": verdict.reason})
            continue
        with torch.no_grad():
            fns = {"pyllm": lambda: ours(ids), "transformers:eager": lambda: hf(ids).logits}
            if compile_baseline:
                torch._dynamo.reset()
                compiled = torch.compile(hf)
                compiled(ids)  # compile outside the timing
                fns["transformers:compile"] = lambda: compiled(ids).logits
            _interleaved(fns, 1)  # warm-up
            seconds = _interleaved(fns, repeats)
        flops = _prefill_flops(hf.config, prompt)
        for impl, s in seconds.items():
            row = {**base, "case": f"prefill B1 S{prompt}", "impl": impl, "status": "ok",
                   "seconds": s, "tokens_per_s": prompt / s, "gflops": flops / s / 1e9,
                   "error": verdict.error, "error_bound": verdict.bound}
            if ceilings is not None:
                row["fraction_of_peak"] = row["gflops"] / ceilings.matmul_gflops[dtype_name]
            rows.append(row)
        for batch in batches:
            prompts = torch.randint(0, hf.config.vocab_size, (batch, prompt), generator=gen)
            prompts = prompts.to(device)
            fns = {
                "pyllm": lambda: ours.generate(prompts, new),
                "transformers:eager": lambda: hf.generate(
                    prompts, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                    pad_token_id=0),
            }
            seconds = _interleaved(fns, repeats)
            for impl, s in seconds.items():
                rows.append({**base, "case": f"generate B{batch} {prompt}+{new}", "impl": impl,
                             "status": "ok", "seconds": s, "tokens_per_s": batch * new / s})
        del hf, ours
    return _finish(rows, output_dir, stream)


def _finish(rows, output_dir, stream):
    _add_speedups(rows)
    print(format_model_table(rows), file=stream)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, time.strftime("models-%Y%m%d-%H%M%S.json"))
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"results: {path}", file=stream)
    return rows


def _llama_pair(dtype: torch.dtype, device: str):
    """TinyLlama-1.1B's shapes (22 layers, width 2048, 32 heads, 4 KV heads,
    MLP 5632, vocabulary 32000), random weights (normal, std 0.02), in
    transformers and in pyllm."""
    import transformers

    from pyllm.models import LlamaForCausalLM

    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                      num_hidden_layers=22, num_attention_heads=32,
                                      num_key_value_heads=4, max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(config)
    hf = hf.to_empty(device=device).to(dtype).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.02)
    return hf, LlamaForCausalLM.from_hf(hf).eval()


def _llama_rows(dtypes, batches, device, quick, repeats) -> list[dict]:
    """Prefill (tokens/s of a 128-token prompt's logits) and decode (tokens/s
    of the steps after it: (tokens of a 64-token generate - of a 1-token one)
    over the time difference) of the 1.1B LLaMA, pyllm against transformers
    eager; "pyllm:packed" is the same model after ``pack_for_inference()``
    (the packed copies switched in and out per call, so both are timed
    interleaved). Correctness: tests/test_models_llama.py (same logits and
    tokens as transformers on small configurations), tests/test_packed_linear.py
    (packed against unpacked)."""
    prompt, new = (32, 8) if quick else (128, 64)
    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        hf, ours = _llama_pair(dtype, device)
        weights = sum(p.numel() * p.element_size() for p in ours.parameters())
        packs = {}
        if device == "cpu":
            ours.pack_for_inference()
            packs = {m: m._pack for m in ours.modules() if getattr(m, "_pack", None) is not None}

        def use(packed: bool):
            for m, p in packs.items():
                m._pack = p if packed else None
            return ours

        impls = ("pyllm", "pyllm:packed", "transformers:eager") if packs else (
            "pyllm", "transformers:eager")
        base = {"model": "llama-1.1b", "dtype": dtype_name, "device": device,
                "threads": torch.get_num_threads(), "status": "ok"}
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 32000, (1, prompt), generator=gen).to(device)
        with torch.no_grad():
            fns = {"pyllm": lambda: use(False)(ids), "transformers:eager": lambda: hf(ids).logits}
            if packs:
                fns["pyllm:packed"] = lambda: use(True)(ids)
            _interleaved(fns, 1)
            seconds = _interleaved(fns, repeats)
        for impl, sec in seconds.items():
            rows.append({**base, "case": f"prefill B1 S{prompt}", "impl": impl, "seconds": sec,
                         "tokens_per_s": prompt / sec})
        for batch in batches:
            prompts = torch.randint(0, 32000, (batch, prompt), generator=gen).to(device)
            calls = {}
            for steps in (1, new):
                calls[("pyllm", steps)] = lambda s=steps: use(False).generate(prompts, s)
                if packs:
                    calls[("pyllm:packed", steps)] = lambda s=steps: use(True).generate(prompts, s)
                calls[("transformers:eager", steps)] = lambda s=steps: hf.generate(
                    prompts, max_new_tokens=s, min_new_tokens=s, do_sample=False, pad_token_id=0)
            seconds = _interleaved(calls, repeats)
            for impl in impls:
                sec = seconds[(impl, new)] - seconds[(impl, 1)]
                rows.append({**base, "case": f"decode B{batch} {prompt}+{new}", "impl": impl,
                             "seconds": sec, "tokens_per_s": batch * (new - 1) / sec,
                             "weights_gbps": (new - 1) * weights / sec / 1e9})
        del hf, ours
    return rows


def _training_rows(dtypes, device, quick, repeats, compile_baseline) -> list[dict]:
    """One training step of GPT-2 small (B=4, S=512; 2 x 128 with quick):
    forward, causal-LM loss, backward and AdamW, pyllm's model against the
    same weights in transformers (eager, and torch.compile of it); bfloat16
    is autocast over float32 weights, as mixed-precision training runs."""
    from pyllm.models import causal_lm_loss

    batch, seq = (2, 128) if quick else (4, 512)
    rows = []
    for dtype_name in dtypes:
        autocast = dtype_name == "bfloat16"
        hf, ours = _gpt2_pair(torch.float32, device)
        hf.train()
        ours.train()
        ids = torch.randint(0, 50257, (batch, seq), generator=torch.Generator().manual_seed(1))
        ids = ids.to(device)

        def stepper(model, loss_of):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

            def step():
                with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                    loss = loss_of(model)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step

        fns = {"pyllm": stepper(ours, lambda m: causal_lm_loss(m(ids), ids)),
               "transformers:eager": stepper(hf, lambda m: m(ids, labels=ids).loss)}
        if compile_baseline:
            torch._dynamo.reset()
            twin = copy.deepcopy(hf)
            compiled = torch.compile(twin)
            fns["transformers:compile"] = stepper(twin, lambda m: compiled(ids, labels=ids).loss)
        _interleaved(fns, 1)  # warm-up (and compile)
        seconds = _interleaved(fns, repeats)
        base = {"model": "gpt2-small", "dtype": "bf16 autocast" if autocast else dtype_name,
                "device": device, "threads": torch.get_num_threads(), "status": "ok"}
        for impl, sec in seconds.items():
            rows.append({**base, "case": f"train step B{batch} S{seq}", "impl": impl,
                         "seconds": sec, "tokens_per_s": batch * seq / sec})
        del hf, ours
    return rows


def _truth_logits(hf, ids):
    """Logits of a float64 copy of ``hf`` (the truth of the accuracy rule)."""
    exact = copy.deepcopy(hf).double()
    return exact(ids).logits


def _add_speedups(rows):
    """speedup_vs_<baseline> on the pyllm rows: baseline seconds / pyllm seconds."""
    by_case = {}
    for r in rows:
        if r["status"] == "ok":
            by_case.setdefault((r["case"], r["dtype"]), {})[r["impl"]] = r["seconds"]
    for r in rows:
        if not r.get("impl", "").startswith("pyllm") or r["status"] != "ok":
            continue
        for impl, s in by_case[(r["case"], r["dtype"])].items():
            if not impl.startswith("pyllm"):
                r[f"speedup_vs_{impl.split(':', 1)[1]}"] = s / r["seconds"]


def _rate(r) -> str:
    if "weights_gbps" in r:
        return f"  {r['weights_gbps']:.1f} GB/s of weights"
    if "gflops" not in r:
        return ""
    peak = r.get("fraction_of_peak")
    return f"  {r['gflops']:.0f}" + (f" ({peak:.0%})" if peak is not None else "")


def format_model_table(rows) -> str:
    """The rows as a text table (speed-ups on pyllm's rows)."""
    lines = [f"{'case':<24} {'dtype':<9} {'impl':<22} {'seconds':>8} {'tokens/s':>9} "
             f"{'x eager':>8} {'x compile':>9}  GFLOP/s (of matmul peak)"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['case']:<24} {r['dtype']:<9} {r['impl']:<22} {r['status']}: "
                         f"{r.get('note', '')}")
            continue
        eager = r.get("speedup_vs_eager")
        comp = r.get("speedup_vs_compile")
        lines.append(f"{r['case']:<24} {r['dtype']:<9} {r['impl']:<22} {r['seconds']:8.3f} "
                     f"{r['tokens_per_s']:9.1f} {eager and f'{eager:.2f}x' or '':>8} "
                     f"{comp and f'{comp:.2f}x' or '':>9}" + _rate(r))
    return "\n".join(lines)
