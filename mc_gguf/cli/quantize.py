"""mc-gguf quantize: a checkpoint quantized to a plan, written as GGUF."""

from __future__ import annotations

import argparse
import time

from mc_gguf.cli.common import MODEL_HELP, add_command, add_tune_flags, tune_settings

EXAMPLE = "example: mc-gguf quantize ./Mixtral-8x7B-v0.1 --plan plan.json --stats mixtral.stats -o mixtral-mc.gguf"


def add_parser(commands) -> None:
    p = add_command(commands, "quantize", "Quantize a Hugging Face checkpoint to a plan with ggml's quantizers and "
                    "write the GGUF (one expert in memory at a time; written atomically).", EXAMPLE)
    p.add_argument("model_dir", help=MODEL_HELP)
    p.add_argument("--plan", required=True, help="plan from `mc-gguf allocate`")
    p.add_argument("--stats", help="calibration statistics: importance matrices (needed by IQ1/IQ2 types) and "
                   "Hessians for GPTQ")
    p.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ error compensation with ggml's quantizer (default: on when the statistics hold Hessians)")
    add_tune_flags(p)
    p.add_argument("-o", "--output", required=True, help="the GGUF file to write")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from mc_gguf.allocate.plan import load_plan
    from mc_gguf.calibrate.stats import load_stats
    from mc_gguf.gguf_io.requirements import runs_in
    from mc_gguf.quantize.quantization import quantize

    tune = tune_settings(args)  # a device this machine lacks is refused first
    stats = load_stats(args.stats) if args.stats else None
    started = time.perf_counter()
    out = quantize(args.model_dir, load_plan(args.plan), args.output, stats=stats, gptq=args.gptq,
                   tune=tune, progress=not args.quiet)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - started:.0f} s")
    print(runs_in(out))
