"""mc-gguf quantize: a checkpoint quantized to a plan, written as GGUF."""

from __future__ import annotations

import argparse
import time

from mc_gguf.cli.common import (MODEL_HELP, add_command, add_device_flag, add_ray_flag, add_tune_flags,
                                add_tune_iters_flag, tune_settings)
from mc_gguf.quantize.settings import TuneSettings

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
    add_ray_flag(p, "quantize the experts (GPTQ and tuning, an expert per task; needs --stats)")
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
                   tune=tune, ray=args.ray, progress=not args.quiet)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - started:.0f} s")
    print(runs_in(out))


def add_tuned_errors_parser(commands) -> None:
    p = add_command(commands, "tuned-errors", "How much tuning lowers each candidate type's error, measured on a "
                    "seeded sample of experts and rows (what compress measures between calibrating and "
                    "allocating): ratios that `allocate --error-scale` multiplies the calibration's errors by, so "
                    "that the stages give compress's file.",
                    "example: mc-gguf tuned-errors ./Mixtral-8x7B-v0.1 mixtral.stats -o tuned.json\n"
                    "         mc-gguf allocate mixtral.stats --bits 2.5 --per-projection --alpha 0 --beta 0 "
                    "--gamma 2 --error-scale tuned.json -o plan.json")
    p.add_argument("model_dir", help=MODEL_HELP)
    p.add_argument("stats", help="statistics from `mc-gguf calibrate --hessian`")
    p.add_argument("-o", "--output", required=True, help="the ratios to write (JSON)")
    add_tune_iters_flag(p)
    add_device_flag(p, "the tuning")
    add_ray_flag(p, "measure the sampled experts (an expert per task)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_tuned_errors)


def run_tuned_errors(args: argparse.Namespace) -> None:
    from mc_gguf.atomic import check_output_path
    from mc_gguf.calibrate.stats import load_stats
    from mc_gguf.device import torch_device
    from mc_gguf.errors import InvalidValueError
    from mc_gguf.quantize.tuned_errors import measured_tuned_errors

    torch_device(args.device)
    out = check_output_path(args.output, inputs=[args.stats])
    stats = load_stats(args.stats)
    if not stats.has_hessian:
        raise InvalidValueError(f"{args.stats} holds no inputs for the Hessians: calibrate with --hessian")
    started = time.perf_counter()
    measured = measured_tuned_errors(args.model_dir, stats, TuneSettings(iters=args.tune_iters, device=args.device),
                                     ray=args.ray, progress=not args.quiet)
    measured.save(out)
    for name, ratio in measured.ratios.items():
        print(f"  {name:8} {ratio:.3f}")
    print(f"wrote {out} in {time.perf_counter() - started:.0f} s")
