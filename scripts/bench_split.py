#!/usr/bin/env python3
"""Where a whole file's KL divergence comes from, and the lowest any split of its bytes can reach.

The whole-file target (bench_quality.py --whole-file) asks for llama.cpp's Q4_K_M quality at the size of
its IQ2_XS file. Whether another split of those bytes between the experts and the other tensors could get
there, or only better quantizers, is measured here on one set of statistics, every file evaluated alike
(mc-gguf eval's protocol, KL divergence from the F16 file):
- the base: every tensor at Q8_0 (experts included);
- each class of the other tensors (token_embd, output, attention: every attn_q/k/v/output at one type) at
  each type of TENSOR_CANDIDATES, everything else at Q8_0, tuned on its Hessian as compress does;
- the experts at each of --expert-bits (compress's defaults: tuned, a type per projection, the tuned
  errors' ratios), everything else at Q8_0, and with --lattice also with the i-quants' grid points moved.
Each class's cost is its file's KL divergence over the base's, its bytes the GGUF's. With the costs added
(the base plus each class's increment; checked on the files below), the lowest KL divergence a file of
the target size can have is found two ways: the best choice of one measured point per class (exhaustive),
and a bound below every mixture of them (a linear program over each class's points: what a plan mixing
types between tensors of a class could reach at best). Then the file at the best choice is made
(`compress --size` with the other tensors' types fixed) and measured, beside compress's default file at
the same size and llama.cpp's recipe and Q4_K_M: how far the additive model is from the measured file,
and how much lower the experts' KL divergence would have to be, at the bytes the best split leaves them,
for the file to reach Q4_K_M.

    python scripts/bench_split.py [--at IQ2_XS] [--stats STATS] [--workdir build/bench-split] [--lattice]
    python scripts/bench_split.py --quick   (a tiny model built here: checks the script works)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from itertools import product
from pathlib import Path

import numpy as np
from bench_common import add_input_flags, add_output_flags, add_window_flags, emit_json, statistics
from bench_quality import WHOLE_FILE_RECIPES, llama_cpp_files, produce, quick_inputs

CLASSES = ("token_embd", "output", "attn")
Q8_0 = dict.fromkeys(CLASSES, "Q8_0")
EXPERT_BITS = (1.6, 1.8, 2.0, 2.25, 2.5, 2.75, 3.07)


def tensor_class(name: str) -> str:
    """The byte class of a GGUF tensor: experts, the three other classes, or "fixed" (norms, router)."""
    if "_exps" in name:
        return "experts"
    if name == "token_embd.weight":
        return "token_embd"
    if name == "output.weight":
        return "output"
    if any(f".attn_{m}.weight" in name for m in ("q", "k", "v", "output")):
        return "attn"
    return "fixed"


def class_bytes(path: Path) -> dict[str, int]:
    import gguf

    sizes = dict.fromkeys(("experts", *CLASSES, "fixed"), 0)
    for t in gguf.GGUFReader(path).tensors:
        sizes[tensor_class(t.name)] += int(t.n_bytes)
    sizes["fixed"] += path.stat().st_size - sum(sizes.values())   # header, keys, alignment
    return sizes


def quantized(model: str, stats, work: Path, name: str, plan, tune) -> Path:
    """The file of ``plan``, tuned with ``tune`` as compress tunes, made once in ``work`` and reused."""
    from mc_gguf.quantize.quantization import quantize

    return produce(work / (name.replace(" ", "-") + ".gguf"),
                   lambda tmp: quantize(model, plan, tmp, stats=stats, tune=tune, progress=False))


def files(model: str, stats, work: Path, target: int, args) -> tuple[list[dict], dict[str, float]]:
    """The base, each class at each type, and the experts at each budget (see the module's docstring), and the
    tuned errors' ratios their plans were made with."""
    from mc_gguf.allocate.allocation import allocate
    from mc_gguf.allocate.cost import COMPRESS_COST
    from mc_gguf.ggml.types import TENSOR_CANDIDATES
    from mc_gguf.quantize.tune import TuneSettings
    from mc_gguf.quantize.tuned_errors import tuned_error_ratios

    tune = TuneSettings()
    ratios = tuned_error_ratios(model, stats, list(stats.types), settings=tune, progress=False)

    def make(name: str, plan, settings=tune) -> Path:
        return quantized(model, stats, work, name, plan, settings)

    q8_bits = 8.5  # every expert at Q8_0
    base = allocate(stats, q8_bits, model_dir=model, non_expert=Q8_0, **COMPRESS_COST)
    if {t for layer in base.experts for expert in layer for t in expert.values()} != {"Q8_0"}:
        raise RuntimeError("the base plan does not hold every expert at Q8_0")
    configs = [{"name": "base", "class": "base", "path": make("base Q8_0", base)}]
    for cls, qtype in product(CLASSES, TENSOR_CANDIDATES):
        if qtype != "Q8_0":
            plan = replace(base, non_expert={**Q8_0, cls: qtype})
            configs.append({"name": f"{cls} {qtype}", "class": cls, "type": qtype,
                            "path": make(f"class {cls} {qtype}", plan)})
    settings = [("experts", tune)] + ([("experts lattice", replace(tune, lattice=True))] if args.lattice else [])
    for bits, (cls, t) in product(args.expert_bits, settings):
        plan = allocate(stats, bits, model_dir=model, non_expert=Q8_0, error_scale=ratios, per_projection=True,
                        **COMPRESS_COST)
        configs.append({"name": f"{cls} {bits}", "class": cls, "bits": bits,
                        "path": make(f"class {cls} {bits}", plan, t)})
    chosen = allocate(stats, size=target, model_dir=model, error_scale=ratios, per_projection=True, **COMPRESS_COST)
    configs.append({"name": "compress --size (default)", "class": "file", "path": make("file default", chosen)})
    return configs, ratios


def best_split(rows: list[dict], target: int, experts: str) -> dict:
    """The lowest additive KL divergence of a file of at most ``target`` bytes: one measured point per class
    (exhaustive), and the linear program's bound below every mixture of each class's points."""
    from scipy.optimize import linprog

    base = next(r for r in rows if r["class"] == "base")
    fixed = max(r["bytes"]["fixed"] for r in rows if r["class"] != "llama.cpp")   # mc-gguf's header and keys
    points = {}   # class -> [(label, bytes, increment)], the base's Q8_0 point included
    for cls in (*CLASSES, experts):
        key = "experts" if cls == experts else cls
        own = [(r.get("type", r.get("bits")), r["bytes"][key], r["kld_mean"] - base["kld_mean"])
               for r in rows if r["class"] == cls]
        points[key] = own + [("Q8_0", base["bytes"][key], 0.0)]
    names = list(points)
    best = None
    for choice in product(*(points[n] for n in names)):
        size = fixed + sum(p[1] for p in choice)
        if size <= target:
            kld = base["kld_mean"] + sum(p[2] for p in choice)
            if best is None or kld < best[0]:
                best = (kld, size, choice)
    if best is None:
        raise RuntimeError(f"no split of the measured points fits {target} bytes")
    # the bound: weights w >= 0 per point, summing to 1 in every class, bytes <= target
    flat = [(n, p) for n in names for p in points[n]]
    equal = np.array([[1.0 if n == m else 0.0 for n, _ in flat] for m in names])
    bound = linprog([p[2] for _, p in flat], A_ub=[[p[1] for _, p in flat]], b_ub=[target - fixed],
                    A_eq=equal, b_eq=np.ones(len(names)), bounds=(0, None), method="highs")
    mixture = {n: {str(p[0]): round(w, 3) for (m, p), w in zip(flat, bound.x) if m == n and w > 1e-6}
               for n in names}
    return {"experts": experts, "fixed_bytes": fixed,
            "best_choice": {n: {"point": p[0], "bytes": p[1], "kld_increment": p[2]} for n, p in zip(names, best[2])},
            "best_choice_kld": best[0], "best_choice_bytes": best[1],
            "bound_kld": base["kld_mean"] + bound.fun, "bound_mixture": mixture}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_flags(parser)
    parser.add_argument("--stats", help="mc-gguf statistics (`mc-gguf calibrate --hessian`; default: calibrate here)")
    parser.add_argument("--at", default="IQ2_XS", choices=WHOLE_FILE_RECIPES,
                        help="the llama.cpp recipe whose file size is the target (default: IQ2_XS)")
    parser.add_argument("--expert-bits", type=float, nargs="+", default=list(EXPERT_BITS),
                        help=f"the experts' budgets measured (default: {' '.join(map(str, EXPERT_BITS))})")
    parser.add_argument("--lattice", action="store_true",
                        help="also the experts with --tune-lattice (the i-quants' grid points moved)")
    parser.add_argument("--imatrix-chunks", type=int, default=128, help="llama-imatrix chunks (default: 128)")
    add_window_flags(parser)
    add_output_flags(parser, "build/bench-split", "where the GGUF files go (reused)",
                     quick_help="tiny model, few budgets: checks the script")
    args = parser.parse_args()

    from mc_gguf.allocate.allocation import allocate
    from mc_gguf.allocate.cost import COMPRESS_COST
    from mc_gguf.calibrate.calibration import CalibrationSettings
    from mc_gguf.calibrate.text import read_text
    from mc_gguf.evaluate.perplexity import EvalSettings, evaluate_gguf
    from mc_gguf.gguf_io.convert import convert
    from mc_gguf.quantize.tune import TuneSettings
    from mc_gguf.runtime.stock import stock_tools_dir

    started = time.perf_counter()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    settings = CalibrationSettings(hessian=True)
    args.recipes, args.expert_types = (args.at, "Q4_K_M"), ()
    if args.quick:
        args.model, args.calib, args.eval = quick_inputs(work)
        args.ctx, args.windows, args.imatrix_chunks, args.expert_bits = 64, 2, 8, [2.5, 3.07]
        args.at, args.recipes = "Q2_K", ("Q2_K", "Q4_K_M")
        settings = CalibrationSettings(n_tokens=2048, seq_len=128, eps_tokens=1024, hessian=True)
    f16 = produce(work / "f16.gguf", lambda tmp: convert(args.model, tmp, "f16", progress=False))
    stats = replace(statistics(args, work, settings), fisher=None)   # compress's default weighs no error by it

    llama = llama_cpp_files(stock_tools_dir(), f16, Path(args.calib), work, args)
    recipe, q4km = (next(r for r in llama if r["name"] == f"llama.cpp {n}") for n in args.recipes)
    target = recipe["path"].stat().st_size
    made, ratios = files(args.model, stats, work, target, args)
    configs = made + [{**recipe, "class": "llama.cpp"}, {**q4km, "class": "llama.cpp"}]
    text = read_text(args.eval).text
    eval_settings = EvalSettings(n_ctx=args.ctx, max_windows=args.windows)

    def measure(config: dict) -> dict:
        report = evaluate_gguf(config["path"], text, ref=f16, settings=eval_settings, progress=False)
        path = config.pop("path")
        row = {**config, "file": path.name, "bytes": class_bytes(path), "file_mb": path.stat().st_size / 1e6,
               **{k: report[k] for k in ("kld_mean", "kld_stderr", "ppl")}}
        print(f"{row['name']:32s} {row['file_mb']:6.2f} MB  KLD {row['kld_mean']:.5f} ({row['kld_stderr']:.5f})",
              file=sys.stderr, flush=True)
        return row

    rows = [measure(c) for c in configs]
    by_name = {r["name"]: r for r in rows}
    splits = []
    for experts in ("experts", "experts lattice") if args.lattice else ("experts",):
        split = best_split(rows, target, experts)
        # the file at the best choice: compress --size with the other classes' types fixed (the experts get the rest)
        fixed_types = {c: split["best_choice"][c]["point"] for c in CLASSES}
        plan = allocate(stats, size=target, model_dir=args.model, non_expert=fixed_types, error_scale=ratios,
                        per_projection=True, **COMPRESS_COST)
        path = quantized(args.model, stats, work, f"file best split {experts}", plan,
                         TuneSettings(lattice=experts == "experts lattice"))
        made = measure({"name": f"best split, {experts}", "class": "file", "path": path})
        rows.append(made)
        # what the experts would have to reach, at the bytes the best choice gives them, for the file to be Q4_K_M's
        others = sum(split["best_choice"][c]["kld_increment"] for c in CLASSES)
        needed = by_name[q4km["name"]]["kld_mean"] - by_name["base"]["kld_mean"] - others
        have = split["best_choice"]["experts"]["kld_increment"]
        splits.append({**split, "file_kld": made["kld_mean"], "file_bytes": made["bytes"],
                       "file_over_additive": made["kld_mean"] / split["best_choice_kld"],
                       "experts_increment_needed_for_q4_k_m": needed,
                       "experts_over_needed": have / needed if needed > 0 else None})
    report = {"model": args.model, "eval": str(args.eval), "ctx": args.ctx, "windows": args.windows,
              "target": recipe["name"], "target_bytes": target, "q4_k_m_kld": by_name[q4km["name"]]["kld_mean"],
              "default_file_kld": by_name["compress --size (default)"]["kld_mean"],
              "tuned_error_ratios": ratios, "rows": rows, "splits": splits,
              "seconds": round(time.perf_counter() - started, 1)}
    emit_json(report, args.json, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
