#!/usr/bin/env python3
"""Quantization errors measured on a sample of each expert's features, against the full pass.

Calibrates the model twice on the same tokens, measuring eps on every
intermediate feature (the baseline) and on a seeded sample of whole blocks
of 256 (``--eps-features``, the default of `mc-gguf calibrate`), then
compresses both the way `mc-gguf compress` does (its cost exponents,
non-expert tensors at Q8_0) at the same budget and scores both files against
the F16 file on the evaluation text (`mc-gguf eval`'s protocol). Reports
how the sampled errors agree with the full ones (relative error; rank
correlation over the experts of each layer and type), how many experts get
the same types, the two calibration times, and the KLD ratio the issue's
2% bound is about. Prints one JSON object.

    python scripts/bench_eps_sampling.py [--features 256] [--bits 2.5] [--json e.json]
    python scripts/bench_eps_sampling.py --quick   (a tiny model built here: checks the script works)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from bench_common import add_input_flags, add_output_flags, add_window_flags, emit_json
from bench_quality import Q8_NON_EXPERT, produce, quick_inputs
from scipy.stats import spearmanr


def eps_agreement(full, sampled) -> dict:
    """How the sampled eps [3, E, T] of every layer agree with the full pass's."""
    rel, rho = [], []
    for a, b in zip(full.layers, sampled.layers):
        rel.append(np.abs(b.eps / a.eps - 1).reshape(-1))
        for row in range(a.eps.shape[0]):
            for t in range(a.eps.shape[2]):
                rho.append(spearmanr(a.eps[row, :, t], b.eps[row, :, t]).statistic)
    rel = np.concatenate(rel)
    return {"relative_error_median": float(np.median(rel)), "relative_error_p90": float(np.percentile(rel, 90)),
            "relative_error_max": float(rel.max()), "expert_rank_correlation_median": float(np.median(rho)),
            "expert_rank_correlation_min": float(np.min(rho))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_flags(parser)
    parser.add_argument("--features", type=int, default=256,
                        help="sampled features per expert (default: 256, half of the bench model's 512)")
    parser.add_argument("--bits", type=float, default=2.5, help="budget, bits per expert weight (default: 2.5)")
    add_window_flags(parser)
    add_output_flags(parser, "build/bench-eps-sampling", "where the files go (reused)",
                     quick_help="tiny model, few tokens: checks the script")
    args = parser.parse_args()

    from mc_gguf.allocate.allocation import allocate
    from mc_gguf.allocate.cost import COMPRESS_COST
    from mc_gguf.calibrate.calibration import calibrate
    from mc_gguf.calibrate.settings import CalibrationSettings
    from mc_gguf.calibrate.stats import load_stats
    from mc_gguf.calibrate.text import read_text
    from mc_gguf.evaluate.perplexity import EvalSettings, evaluate_gguf
    from mc_gguf.gguf_io.convert import convert
    from mc_gguf.quantize.quantization import quantize

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    settings = CalibrationSettings()
    if args.quick:
        args.model, args.calib, args.eval = quick_inputs(work)
        args.ctx, args.windows = 64, 2
        settings = CalibrationSettings(n_tokens=2048, seq_len=128, eps_tokens=1024, types=("IQ2_XS", "Q2_K", "Q4_K"))
    f16 = produce(work / "f16.gguf", lambda tmp: convert(args.model, tmp, "f16", progress=False))
    text = read_text(args.calib)
    eval_text = read_text(args.eval).text
    runs = {}
    for name, n_features in (("full", 0), ("sampled", args.features)):
        path = work / f"stats-{name}.safetensors"
        started = time.perf_counter()
        stats = load_stats(path) if path.exists() else calibrate(
            args.model, path, text, CalibrationSettings(**{**settings.__dict__, "eps_features": n_features}))
        seconds = time.perf_counter() - started
        plan = allocate(stats, args.bits, model_dir=args.model, non_expert=Q8_NON_EXPERT, **COMPRESS_COST)
        gguf = produce(work / f"{name}-{args.bits}.gguf", lambda tmp, p=plan, s=stats: quantize(
            args.model, p, tmp, stats=s, progress=False))
        report = evaluate_gguf(gguf, eval_text, ref=f16, progress=False,
                               settings=EvalSettings(n_ctx=args.ctx, max_windows=args.windows))
        runs[name] = {"stats": stats, "plan": plan, "calibrate_s": round(seconds, 1),
                      "eps_features": stats.info["eps_features"], "expert_bpw": plan.predicted["expert_bpw"],
                      **{k: report[k] for k in ("kld_mean", "kld_stderr", "ppl", "same_top_token")}}
        print(f"{name}: eps on {stats.info['eps_features']} of {stats.info['expert_ff']} features, calibrated in "
              f"{seconds:.0f} s, KLD {report['kld_mean']:.5f}", file=sys.stderr, flush=True)

    full, sampled = runs["full"], runs["sampled"]
    same = [a == b for la, lb in zip(full["plan"].experts, sampled["plan"].experts) for a, b in zip(la, lb)]
    out = {"model": args.model, "bits": args.bits, "ctx": args.ctx, "windows": args.windows,
           "eps": eps_agreement(full["stats"], sampled["stats"]),
           "experts_with_the_same_types": float(np.mean(same)),
           **{name: {k: v for k, v in run.items() if k not in ("stats", "plan")} for name, run in runs.items()},
           "kld_sampled_over_full": sampled["kld_mean"] / full["kld_mean"]}
    emit_json(out, args.json, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
