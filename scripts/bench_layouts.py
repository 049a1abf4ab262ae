#!/usr/bin/env python3
"""What the stock layout costs in quality: `mc-gguf compress` with its defaults, per-expert against stock.

The per-expert layout (compress's default) gives every expert its own type
and needs mc-gguf's patched runtime; the stock layout (`--layout stock`)
gives the experts of a layer and projection one type, so that every
llama.cpp loads the file. On a model folder (default ../shared/bench/model)
with bench_quality.py's calibration and evaluation texts, for each --bits
budget, this runs what a user types, each command in a process of its own:

    mc-gguf convert MODEL --type f16 -o f16.gguf
    mc-gguf compress MODEL --bits B --calib CALIB -o per-expert-B.gguf
    mc-gguf compress MODEL --bits B --calib CALIB --layout stock -o stock-B.gguf
    mc-gguf eval FILE --text EVAL --ref f16.gguf --ctx 512 --chunks 16 --json

(every other setting compress's default: tuning, a type per projection, its
cost exponents, each run calibrating anew), and reports each file's size,
perplexity and mean KL divergence from F16 (the same protocol and windows
as bench_quality.py, so the figures compare with its table), and at each
budget the stock file's over the per-expert file's.
Prints one JSON object (and writes it to --json).

    python scripts/bench_layouts.py [--bits 2.5 3.07] [--workdir build/bench-layouts] [--json layouts.json]
    python scripts/bench_layouts.py --quick   (a tiny model built here, one budget: checks the script works)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from bench_common import add_input_flags, add_output_flags, add_window_flags, emit_json
from bench_quality import produce, quick_inputs, run_tool

LAYOUTS = ("per-expert", "stock")
LAYOUT_FLAGS = {"per-expert": [], "stock": ["--layout", "stock"]}  # per-expert is compress's default
EVAL_FIGURES = ("ppl", "ppl_stderr", "kld_mean", "kld_stderr", "kld_p99", "same_top_token")
# a tensor of one type's group of experts, written only in the per-expert layout
GROUP_TENSOR = re.compile(r"\.ffn_\w+_exps\.g\d+\.weight$")


def mc_gguf() -> Path:
    """The mc-gguf command of this interpreter's environment."""
    return Path(sys.executable).parent / "mc-gguf"


def compress_file(model: str, bits: float, layout: str, path: Path, args, log: Path) -> dict:
    """``path`` made by `mc-gguf compress` (reused when kept), with its command and, when made here, its time."""
    flags = ["--bits", str(bits), "--calib", str(args.calib), *LAYOUT_FLAGS[layout], *args.compress_extra]
    made, started = not path.exists(), time.perf_counter()
    produce(path, lambda tmp: run_tool(mc_gguf(), ["compress", model, *flags, "-o", str(tmp), "-q"], log))
    return {"command": " ".join(["mc-gguf", "compress", "MODEL", *flags, "-o", path.name]),
            "compress_s": round(time.perf_counter() - started, 1) if made else None}


def eval_file(path: Path, f16: Path, args, log: Path) -> dict:
    """`mc-gguf eval FILE --ref F16 --json`'s report."""
    flags = ["--text", str(args.eval), "--ref", str(f16), "--ctx", str(args.ctx), "--chunks", str(args.windows),
             "--json"]
    with open(log, "a") as err:
        err.write(f"$ mc-gguf eval {path} {' '.join(flags)}\n")
        err.flush()
        result = subprocess.run([str(mc_gguf()), "eval", str(path), *flags], stdout=subprocess.PIPE, stderr=err,
                                text=True)
    if result.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"mc-gguf eval failed (log: {log}):\n" + "\n".join(tail))
    return json.loads(result.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_flags(parser)
    parser.add_argument("--bits", type=float, nargs="+", default=[2.5, 3.07], help="budgets (default: 2.5 3.07)")
    add_window_flags(parser, "evaluation windows, eval's --chunks")
    add_output_flags(parser, "build/bench-layouts", "where the GGUF files go (reused)",
                     quick_help="tiny model, one budget: checks the script")
    args = parser.parse_args()
    args.compress_extra = []

    from mc_gguf.gguf_io.inspect import inspect_gguf

    started = time.perf_counter()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.model, args.calib, args.eval = quick_inputs(work)
        args.ctx, args.windows, args.bits = 64, 2, [2.5]
        # still tuned, per projection: fewer tokens, types and sweeps (minutes, where the defaults take a quarter hour)
        args.compress_extra = ["--tokens", "1024", "--seq-len", "128", "--types", "IQ2_XS", "Q2_K", "Q4_K",
                               "--tune-iters", "1"]
    log = work / "mc-gguf.log"
    f16 = produce(work / "f16.gguf", lambda tmp: run_tool(
        mc_gguf(), ["convert", args.model, "--type", "f16", "-o", str(tmp), "-q"], log))

    rows = []
    for bits in args.bits:
        for layout in LAYOUTS:
            path = work / f"{layout}-{bits}.gguf"
            made = compress_file(args.model, bits, layout, path, args, log)
            report = eval_file(path, f16, args, log)
            info = inspect_gguf(path)
            row = {"bits": bits, "layout": layout, "file": path.name, "file_mb": path.stat().st_size / 1e6,
                   "expert_bpw": info["expert_bpw"],
                   "group_tensors": sum(bool(GROUP_TENSOR.search(t["name"])) for t in info["tensors"]),
                   **{k: report[k] for k in EVAL_FIGURES}, **made}
            rows.append(row)
            print(f"{layout:10s} {bits:5.2f}  {row['file_mb']:7.2f} MB  expert bpw {row['expert_bpw']:.3f}  "
                  f"PPL {row['ppl']:8.3f}  KLD {row['kld_mean']:.5f}  top-1 {row['same_top_token']:.1%}",
                  file=sys.stderr, flush=True)

    by = {(r["bits"], r["layout"]): r for r in rows}
    stock_over_per_expert = {
        str(bits): {k: by[bits, "stock"][k] / by[bits, "per-expert"][k] for k in ("kld_mean", "ppl", "file_mb")}
        for bits in args.bits}
    emit_json({"model": args.model, "calib": str(args.calib), "eval": str(args.eval), "ctx": args.ctx,
               "windows": args.windows, "bits": args.bits,
               "compress_flags": args.compress_extra or "compress's defaults",
               "f16_mb": f16.stat().st_size / 1e6, "rows": rows,
               "stock_over_per_expert": stock_over_per_expert,
               "seconds": round(time.perf_counter() - started, 1)}, args.json, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
