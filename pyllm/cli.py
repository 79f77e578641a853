"""The ``pyllm`` command (also ``python -m pyllm``).

    pyllm info           versions, build record, CPU ISA, backends per op
    pyllm info --json    the same as JSON
    pyllm bench          check, then time every op against PyTorch (the main job)
    pyllm bench --quick  a smoke run of a few cases
    pyllm bench --compare OLD.json   also compare with an earlier run
    pyllm bench --models a GPT-2-small-sized model against transformers
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def _info(args) -> int:
    from pyllm import info

    if args.json:
        print(json.dumps(info.collect(), indent=2, default=str))
    else:
        print(info.report())
    return 0


def _bench(args) -> int:
    import torch

    from pyllm.benchmark import runner

    from pyllm.benchmark import compare

    old = compare.load(args.compare) if args.compare else None  # fail early on a bad path
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.models:
        from pyllm.benchmark.machine import measure_ceilings
        from pyllm.benchmark.models import run_models

        rows = run_models(dtypes=args.dtype, device=device, quick=args.quick,
                          output_dir=args.output, ceilings=measure_ceilings(device, args.quick),
                          model=args.model)
        return 1 if any(r["status"] != "ok" for r in rows) else 0
    if args.list:
        planned = runner.plan(ops=args.ops, dtypes=args.dtype, quick=args.quick, suite=args.suite)
        print(json.dumps(planned, indent=1))
        return 0
    rows = runner.run(ops=args.ops, dtypes=args.dtype, device=device, backends=args.backend,
                      quick=args.quick, output_dir=args.output, suite=args.suite,
                      min_time=args.min_time, plots=not args.no_plots)
    failed = [r for r in rows if r["status"] != "ok"]
    regressed = False
    if old is not None:
        text, regressed = compare.compare(rows, old, args.threshold)
        print(text)
    return 1 if failed or regressed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyllm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser("info", help="what this install has: versions, ISA, backends")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=_info)

    from pyllm.benchmark.cases import BENCHES
    from pyllm.backend import BACKENDS

    bench = commands.add_parser("bench", help="check, then time the kernels against PyTorch")
    bench.add_argument("--ops", nargs="+", choices=sorted(BENCHES), help="ops to run (default all)")
    bench.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"],
                       choices=["float32", "bfloat16", "float16"], help="dtypes (default float32 bfloat16)")
    bench.add_argument("--device", help="cpu or cuda (default: cuda if present, else cpu)")
    bench.add_argument("--backend", nargs="+", choices=BACKENDS,
                       help="pyllm backends to time (default: every kernel backend available)")
    bench.add_argument("--quick", action="store_true", help="a few cases, short timing: a smoke run")
    bench.add_argument("--suite", choices=["default", "gpu"], default="default",
                       help="the case list: default (model shapes, CPU-sized) or gpu (the GPU "
                            "acceptance shapes: FlashAttention's benchmark, 4096x8192 norms, "
                            "4096^3 GEMMs)")
    bench.add_argument("--min-time", type=float, default=None, metavar="S",
                       help="seconds each implementation is timed per case (default 0.4; "
                            "0.15 with --quick)")
    bench.add_argument("--list", action="store_true",
                       help="print the planned cases as JSON and run nothing")
    bench.add_argument("--models", action="store_true",
                       help="time a GPT-2-small-sized model (prefill, generate) against "
                            "transformers instead of the kernels")
    bench.add_argument("--model", default="gpt2-small",
                       choices=["gpt2-small", "llama-1.1b", "gpt2-train"],
                       help="with --models: gpt2-small (prefill, generate; default), llama-1.1b "
                            "(TinyLlama-1.1B's shapes: prefill and decode tokens/s, batch 1 and "
                            "8) or gpt2-train (a training step with AdamW)")
    bench.add_argument("--output", default="bench-results", metavar="DIR",
                       help="where the JSON/CSV results and PNG plots go (default bench-results/; "
                            "'' for none)")
    bench.add_argument("--no-plots", action="store_true",
                       help="write the JSON and CSV results without the PNG plots")
    bench.add_argument("--compare", metavar="OLD.json",
                       help="compare with an earlier run's JSON; exit 1 if a pyllm row got slower")
    bench.add_argument("--threshold", type=float, default=0.15,
                       help="slow-down that counts as a regression for --compare (default 0.15: "
                            "two-thread timings vary by about that much)")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
