#!/usr/bin/env python3
"""Quality per byte: mc-gguf against llama.cpp's own quantizations of the same model.

On a model folder (default ../shared/bench/model) with a calibration and an
evaluation text:
- the F16 GGUF (mc-gguf's converter) is the reference every file is scored against;
- llama.cpp's whole-file recipes (Q2_K, Q3_K_S, Q4_K_M, IQ2_XXS, IQ2_XS,
  IQ3_XXS) made by its own llama-quantize with an importance matrix from its
  own llama-imatrix on the calibration text, both built from the same
  llama-cpp-python sdist as the runtime (unpatched);
- llama.cpp's "expert frontier": the same tools, every non-expert tensor at
  Q8_0 and the experts at one type (`--token-embedding-type q8_0
  --output-tensor-type q8_0 --tensor-type attn_.*=q8_0 --tensor-type
  ffn_.*_exps=TYPE`);
- mc-gguf at each --bits budget, per-expert and stock layouts, non-expert
  tensors at Q8_0 (which is also mc-gguf's default), as `mc-gguf compress`
  makes them (its cost exponents, imatrix quantization), the per-expert
  files also with GPTQ and with tuning (`--tune`: GPTQ, then coordinate
  descent on the K-quant integers and i-quant scales, the plan allocated
  with the tuned errors; also with a type per projection,
  `--per-projection`), each file's compress_s the calibration's time plus
  its own,
  and the first budget's per-expert file with Online Dynamic Pruning
  thresholds for 15% and 25% of the expert slots;
- with --autoround, AutoRound (a peer: `pip install -e .[peers]`, run by
  scripts/peers/autoround_gguf.py) on the same calibration text, experts at
  Q2_K and at Q3_K with SignRound's tuned rounding, every other tensor Q8_0.
Every file is evaluated the same way (`mc-gguf eval`'s protocol: windows of
--ctx tokens, second half scored): perplexity, mean KL divergence from F16,
top-1 agreement, skipped share of expert slots. The answer to "at equal size,
how much better than llama.cpp's best?" is each mc-gguf row's KLD over the
KLD of llama.cpp's Pareto front interpolated at the same file size (and of
AutoRound's, with --autoround).
Prints one JSON object; --json and --png write it and the Pareto plots (with --whole-file, one plot: KLD
against file size, the two families' fronts).

``--whole-file`` measures the whole-file frontier instead: llama.cpp's
recipes with imatrix (WHOLE_FILE_RECIPES, IQ2_XXS to Q4_K_M), and mc-gguf
at the size of each of the --at recipes' files (`compress --size`: its
defaults, tuned with a type per projection), with the non-expert tensors
chosen by the program (its default), chosen without their Hessians (so
not tuned: what tuning them brings) and at each fixed
set of NON_EXPERT_SETS (fixed here, not chosen on the evaluation text), or
the --sets named: each mc-gguf row's KLD over llama.cpp's front at its size,
and over the recipe whose size it took.

    python scripts/bench_quality.py [--stats STATS] [--workdir build/bench-quality] [--json q.json] [--png q.png]
    python scripts/bench_quality.py --whole-file [--at IQ2_XS Q3_K_S] [--sets chosen Q6_K] [--stats STATS]
    python scripts/bench_quality.py --quick   (a tiny model built here, a few configurations: checks the script works)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import replace
from itertools import product
from pathlib import Path

import numpy as np
from bench_common import add_input_flags, add_output_flags, add_window_flags, emit_json

RECIPES = ("Q2_K", "Q3_K_S", "Q4_K_M", "IQ2_XXS", "IQ2_XS", "IQ3_XXS")
EXPERT_TYPES = ("IQ2_XXS", "IQ2_XS", "Q2_K", "IQ3_XXS", "Q3_K", "Q4_K")
Q8_NON_EXPERT = {"token_embd": "Q8_0", "output": "Q8_0", "attn": "Q8_0"}
ODP_SKIPS = (0.15, 0.25)
LLAMA_FAMILIES = ("llama.cpp recipe", "llama.cpp experts")
AUTOROUND_SCHEMES = ("gguf:q2_k_s", "gguf:q3_k_s")
FISHER_TOKENS = 4096  # what the statistics made here measure the Fisher information on ("chosen fisher")
WHOLE_FILE_RECIPES = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M")
# the non-expert tensors' types mc-gguf's whole files are made with (the types the writer holds for them)
# ("chosen": none fixed, the program chooses every other tensor's type from its measured errors, compress's default;
# "chosen untuned": the same without the other tensors' Hessians, so that ggml's quantizer alone quantizes them;
# "chosen fisher": the program with every error weighted by the Fisher information where it lands (calibrate
# --fisher-tokens; the statistics made here measure it on FISHER_TOKENS, the other files are made without it)
NON_EXPERT_SETS = {"chosen": {},
                   "chosen untuned": {},
                   "chosen fisher": {},
                   "Q8_0": Q8_NON_EXPERT,
                   "Q6_K": {"token_embd": "Q6_K", "output": "Q6_K", "attn": "Q6_K"},
                   "Q4_K": {"token_embd": "Q4_K", "output": "Q6_K", "attn": "Q4_K"}}


def run_tool(path: Path, args: list[str], log: Path) -> None:
    with open(log, "a") as out:
        out.write(f"$ {path.name} {' '.join(args)}\n")
        out.flush()
        result = subprocess.run([str(path), *args], stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"{path.name} failed (log: {log}):\n" + "\n".join(tail))


def produce(path: Path, make) -> Path:
    """``make(tmp)`` writes the file under a temporary name, renamed when done; kept files are reused."""
    if not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        make(tmp)
        os.replace(tmp, path)
    return path


def llama_cpp_files(tools: Path, f16: Path, calib: Path, work: Path, args) -> list[dict]:
    """llama.cpp's recipes and uniform expert types, made by its own tools."""
    log = work / "llama-tools.log"
    threads = str(os.cpu_count() or 1)
    imatrix = produce(work / "imatrix.gguf", lambda tmp: run_tool(
        tools / "llama-imatrix", ["-m", str(f16), "-f", str(calib), "-o", str(tmp), "--output-format", "gguf",
                                  "-c", str(args.ctx), "--chunks", str(args.imatrix_chunks), "-t", threads], log))
    configs = []
    for recipe in args.recipes:
        path = produce(work / f"llama-{recipe}.gguf", lambda tmp, r=recipe: run_tool(
            tools / "llama-quantize", ["--imatrix", str(imatrix), str(f16), str(tmp), r, threads], log))
        configs.append({"name": f"llama.cpp {recipe}", "family": LLAMA_FAMILIES[0], "path": path})
    for expert_type in args.expert_types:
        flags = ["--imatrix", str(imatrix), "--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0",
                 "--tensor-type", "attn_.*=q8_0", "--tensor-type", f"ffn_.*_exps={expert_type.lower()}"]
        path = produce(work / f"llama-experts-{expert_type}.gguf", lambda tmp, t=expert_type, f=flags: run_tool(
            tools / "llama-quantize", [*f, str(f16), str(tmp), t, threads], log))
        configs.append({"name": f"llama.cpp experts {expert_type}", "family": LLAMA_FAMILIES[1], "path": path})
    return configs


def mc_gguf_files(model: str, stats, work: Path, args) -> list[dict]:
    """mc-gguf's files: compress's plans at each budget and layout, GPTQ, tuning, and ODP thresholds."""
    from mc_gguf.allocate.allocation import allocate
    from mc_gguf.allocate.cost import COMPRESS_COST
    from mc_gguf.prune.calibration import odp_from_stats
    from mc_gguf.quantize.quantization import quantize
    from mc_gguf.quantize.tune import TuneSettings
    from mc_gguf.quantize.tuned_errors import tuned_error_ratios

    configs = []
    tune = TuneSettings()
    if stats.has_hessian:   # the same ratios with or without the grid points moved (tuned_errors.py)
        started = time.perf_counter()
        ratios = tuned_error_ratios(model, stats, list(stats.types), settings=tune, progress=False)
        ratio_seconds = time.perf_counter() - started
    for bits in args.bits:
        for layout in ("per-expert", "stock"):
            plan = allocate(stats, bits, model_dir=model, layout=layout, non_expert=Q8_NON_EXPERT, **COMPRESS_COST)
            variants = [("", plan, False, None, None)]
            if layout == "per-expert" and stats.has_hessian:
                variants.append((" gptq", plan, True, None, None))
                tuned = {per_projection: allocate(stats, bits, model_dir=model, layout=layout,
                                                  non_expert=Q8_NON_EXPERT, error_scale=ratios,
                                                  per_projection=per_projection, **COMPRESS_COST)
                         for per_projection in (False, True)}
                variants += [(" tune", tuned[False], True, tune, None),
                             (" tune per-projection", tuned[True], True, tune, None),
                             (" tune per-projection lattice", tuned[True], True, replace(tune, lattice=True), None)]
            if layout == "per-expert" and bits == args.bits[0]:
                variants += [(f" odp {skip:.0%}", plan, False, None, skip) for skip in ODP_SKIPS]
            variants = [v for v in variants if MC_VARIANTS[v[0]] in args.variants]
            for suffix, p, gptq, t, skip in variants:
                name = f"mc-gguf {layout} {bits}{suffix}"
                odp = odp_from_stats(stats, skip) if skip else None
                path = work / (name.replace(" ", "-").replace("%", "") + ".gguf")
                started = time.perf_counter()
                produce(path, lambda tmp, p=p, g=gptq, t=t, o=odp: quantize(
                    model, p, tmp, stats=stats, gptq=g, tune=t, odp=o, progress=False))
                seconds = time.perf_counter() - started
                if t is not None:  # as compress does, a tuned file's time includes measuring the tuned errors
                    seconds += ratio_seconds
                configs.append({"name": name, "family": "mc-gguf", "path": path, "bits": bits, "layout": layout,
                                "gptq": gptq, "tune": t is not None, "lattice": t is not None and t.lattice,
                                "odp_target_skip": skip,
                                "quantize_s": round(seconds, 1),
                                # what `compress` takes: the calibration (with the Hessians' inputs) and this
                                "compress_s": round(seconds + args.calibrate_s, 1) if args.calibrate_s else None})
    return configs


# the --variants of mc-gguf's files in the expert frontier, by the name's suffix ("default": compress's)
MC_VARIANTS = {"": "ggml", " gptq": "gptq", " tune": "tune", " tune per-projection": "default",
               " tune per-projection lattice": "lattice", **{f" odp {skip:.0%}": "odp" for skip in ODP_SKIPS}}


def whole_files(model: str, stats, work: Path, llama: list[dict], args) -> list[dict]:
    """mc-gguf's files at the sizes of llama.cpp's --at recipes, as `compress --size S --tensor-type ...` makes
    them (its cost, tuning, a type per projection), one per set of non-expert types that fits."""
    from mc_gguf.allocate.allocation import allocate
    from mc_gguf.allocate.cost import COMPRESS_COST
    from mc_gguf.allocate.program import InfeasibleBudgetError
    from mc_gguf.quantize.quantization import quantize
    from mc_gguf.quantize.tune import TuneSettings
    from mc_gguf.quantize.tuned_errors import tuned_error_ratios

    tune = TuneSettings()
    started = time.perf_counter()
    ratios = tuned_error_ratios(model, stats, list(stats.types), settings=tune, progress=False)
    ratio_seconds = time.perf_counter() - started
    variants = {"chosen untuned": replace(stats, tensors={name: replace(t, hessian=None)
                                                          for name, t in stats.tensors.items()}),
                "chosen fisher": args.fisher_stats}
    configs = []
    for row in llama:
        recipe = row["name"].removeprefix("llama.cpp ")
        if recipe not in args.at:
            continue
        size = row["path"].stat().st_size
        for label in args.sets:
            name = f"mc-gguf file {recipe} size non-expert {label}"
            used = variants.get(label, stats)
            if label == "chosen fisher" and used.fisher is None:
                print(f"{name}: the statistics have no Fisher information (calibrate --fisher-tokens); skipped",
                      file=sys.stderr, flush=True)
                continue
            try:
                plan = allocate(used, size=size, model_dir=model, non_expert=NON_EXPERT_SETS[label],
                                error_scale=ratios, per_projection=True, **COMPRESS_COST)
            except InfeasibleBudgetError as exc:
                print(f"{name}: {exc}", file=sys.stderr, flush=True)
                continue
            path = work / (name.replace(" ", "-") + ".gguf")
            started = time.perf_counter()
            produce(path, lambda tmp, p=plan, u=used: quantize(model, p, tmp, stats=u, tune=tune, progress=False))
            configs.append({"name": name, "family": "mc-gguf", "path": path, "target_bytes": size,
                            "size_of": row["name"], "non_expert": label, "tune": True,
                            "quantize_s": round(time.perf_counter() - started + ratio_seconds, 1)})
    return configs


def autoround_files(model: str, calib: Path, work: Path, args) -> list[dict]:
    """AutoRound's files, each made by scripts/peers/autoround_gguf.py in a process of its own."""
    peer = Path(__file__).resolve().parent / "peers" / "autoround_gguf.py"
    configs = []
    for scheme in args.autoround_schemes:
        expert_type = scheme.split(":")[1].upper().removesuffix("_S")  # gguf:q2_k_s: Q2_K experts
        name = f"AutoRound experts {expert_type} iters {args.autoround_iters}"
        path = work / (name.replace(" ", "-") + ".gguf")
        started = time.perf_counter()
        produce(path, lambda tmp, s=scheme: run_tool(
            Path(sys.executable), [str(peer), model, "--calib", str(calib), "--scheme", s, "--experts-only",
                                   "--iters", str(args.autoround_iters), *args.autoround_extra, "-o", str(tmp)],
            work / "autoround.log"))
        configs.append({"name": name, "family": "AutoRound", "path": path,
                        "quantize_s": round(time.perf_counter() - started, 1)})
    return configs


def pareto_front(rows: list[dict], x: str, y: str) -> list[dict]:
    """Rows no other row beats on both ``x`` and ``y`` (smaller is better), sorted by ``x``."""
    front, best = [], float("inf")
    for row in sorted(rows, key=lambda r: (r[x], r[y])):
        if row[y] < best:
            front.append(row)
            best = row[y]
    return front


def kld_of_llama_cpp_at(rows: list[dict], file_mb: float, families=LLAMA_FAMILIES) -> float | None:
    """The best KLD of ``families`` (llama.cpp's) at ``file_mb``: their Pareto front, log KLD interpolated in
    size (None outside it)."""
    front = pareto_front([r for r in rows if r["family"] in families], "file_mb", "kld_mean")
    sizes = [r["file_mb"] for r in front]
    if len(front) < 2 or not sizes[0] <= file_mb <= sizes[-1]:
        return None
    return float(np.exp(np.interp(file_mb, sizes, [np.log(r["kld_mean"]) for r in front])))


def plot(rows: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"llama.cpp recipe": ("tab:gray", "s"), "llama.cpp experts": ("tab:blue", "o"),
              "mc-gguf": ("tab:red", "^"), "AutoRound": ("tab:green", "D")}
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for (i, x), (j, y) in product(enumerate(("expert_bpw", "file_mb")), enumerate(("kld_mean", "ppl"))):
        ax = axes[j][i]
        for family, (color, marker) in styles.items():
            members = [r for r in rows if r["family"] == family]
            ax.scatter([r[x] for r in members], [r[y] for r in members], color=color, marker=marker, label=family)
            front = pareto_front(members, x, y)
            ax.plot([r[x] for r in front], [r[y] for r in front], color=color, alpha=0.5)
        for r in rows:
            ax.annotate(r["name"].replace("llama.cpp ", "").replace("mc-gguf ", ""), (r[x], r[y]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        if y == "kld_mean":
            ax.set_yscale("log")
        ax.set_xlabel({"expert_bpw": "expert bits per weight", "file_mb": "file size (MB)"}[x])
        ax.set_ylabel({"kld_mean": "mean KL divergence from F16", "ppl": "perplexity"}[y])
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def plot_whole_file(rows: list[dict], png: Path, title: str) -> None:
    """The whole-file frontier: KLD against file size, llama.cpp's recipes and mc-gguf's files, each family's
    Pareto front drawn through its points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for family, label, color, marker in (("llama.cpp recipe", "llama.cpp recipe + imatrix", "tab:gray", "s"),
                                         ("mc-gguf", "mc-gguf compress --size", "tab:red", "^")):
        members = [r for r in rows if r["family"] == family]
        front = pareto_front(members, "file_mb", "kld_mean")
        ax.plot([r["file_mb"] for r in front], [r["kld_mean"] for r in front], color=color, alpha=0.6)
        ax.scatter([r["file_mb"] for r in members], [r["kld_mean"] for r in members], color=color, marker=marker,
                   label=label, zorder=3)
        for r in members:
            short = r["name"].removeprefix("llama.cpp ") if family != "mc-gguf" else f"{r['file_mb']:.2f} MB"
            ax.annotate(short, (r["file_mb"], r["kld_mean"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("mean KL divergence from F16")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def quick_inputs(work: Path) -> tuple[str, Path, Path]:
    """A tiny seeded model and two halves of mc-gguf's default calibration text."""
    from mc_gguf.calibrate.text import default_text
    from mc_gguf.hf.tiny import build_tiny_mixtral

    model = work / "tiny-model"
    if not (model / "config.json").exists():
        build_tiny_mixtral(model)
    text = default_text().text
    (work / "calib.txt").write_text(text[:len(text) // 2], encoding="utf-8")
    (work / "eval.txt").write_text(text[len(text) // 2:], encoding="utf-8")
    return str(model), work / "calib.txt", work / "eval.txt"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_flags(parser)
    parser.add_argument("--stats", help="mc-gguf statistics (`mc-gguf calibrate --hessian`; default: calibrate here)")
    parser.add_argument("--bits", type=float, nargs="+", default=[2.5, 2.25, 3.07, 2.06],
                        help="mc-gguf budgets; ODP variants use the first (default: 2.5 2.25 3.07 2.06)")
    add_window_flags(parser)
    parser.add_argument("--imatrix-chunks", type=int, default=128,
                        help="llama-imatrix chunks of --ctx tokens (default: 128, i.e. 65,536 tokens as mc-gguf)")
    parser.add_argument("--autoround", action="store_true",
                        help="also AutoRound's files (pip install -e .[peers]; 17-21 minutes each on 2 cores)")
    parser.add_argument("--autoround-iters", type=int, default=100, help="AutoRound's SignRound iterations (default: 100)")
    add_output_flags(parser, "build/bench-quality", "where the GGUF files go (reused)",
                     quick_help="tiny model, two of each kind: checks the script")
    parser.add_argument("--png", help="write the Pareto plots here")
    parser.add_argument("--variants", nargs="+", default=["ggml", "gptq", "tune", "default", "odp"],
                        choices=sorted(set(MC_VARIANTS.values())), metavar="VARIANT",
                        help="mc-gguf's files in the expert frontier: ggml (imatrix alone, and the stock layout), "
                        "gptq, tune (one type per expert), default (compress's: tuned, a type per projection), "
                        "lattice (the same with --tune-lattice: the i-quants' grid points moved too), odp (the first "
                        "budget with pruning) (default: all but lattice)")
    parser.add_argument("--whole-file", action="store_true",
                        help="the whole-file frontier: llama.cpp's recipes IQ2_XXS to Q4_K_M with imatrix, and "
                        "mc-gguf at the sizes of the --at recipes' files with each set of non-expert types")
    parser.add_argument("--at", nargs="+", default=["IQ2_XS", "Q3_K_S"], choices=WHOLE_FILE_RECIPES,
                        metavar="RECIPE",
                        help="--whole-file: the recipes whose file sizes mc-gguf is made at (default: IQ2_XS Q3_K_S)")
    parser.add_argument("--sets", nargs="+", default=list(NON_EXPERT_SETS), choices=list(NON_EXPERT_SETS),
                        metavar="SET", help="--whole-file: the sets of non-expert types mc-gguf's files are made with "
                        f"(default: all, {', '.join(NON_EXPERT_SETS)})")
    args = parser.parse_args()
    args.recipes, args.expert_types = RECIPES, EXPERT_TYPES
    if args.whole_file:
        args.recipes, args.expert_types = WHOLE_FILE_RECIPES, ()
    args.autoround_schemes, args.autoround_extra = AUTOROUND_SCHEMES, []
    args.calibrate_s = None  # measured when the statistics are made here

    from mc_gguf.calibrate.calibration import CalibrationSettings, calibrate
    from mc_gguf.calibrate.stats import load_stats
    from mc_gguf.calibrate.text import read_text
    from mc_gguf.evaluate.perplexity import EvalSettings, evaluate_gguf
    from mc_gguf.gguf_io.convert import convert
    from mc_gguf.gguf_io.inspect import inspect_gguf
    from mc_gguf.runtime.stock import stock_tools_dir

    started = time.perf_counter()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    # the Fisher information only where a file is priced with it (its backward is no part of compress's time)
    fisher = args.whole_file and "chosen fisher" in args.sets
    settings = CalibrationSettings(hessian=True, fisher_tokens=FISHER_TOKENS if fisher else 0)
    if args.quick:
        args.model, args.calib, args.eval = quick_inputs(work)
        args.ctx, args.windows, args.imatrix_chunks, args.bits = 64, 2, 8, [2.5]
        args.recipes, args.expert_types = ("Q2_K",), ("IQ2_XS",)
        if args.whole_file:
            args.recipes, args.expert_types, args.at = ("Q2_K", "Q4_K_M"), (), ["Q4_K_M"]
        args.autoround_schemes, args.autoround_iters = AUTOROUND_SCHEMES[:1], 2
        args.autoround_extra = ["--nsamples", "8", "--seqlen", "64", "--batch-size", "4"]
        settings = CalibrationSettings(n_tokens=2048, seq_len=128, eps_tokens=1024, hessian=True,
                                       fisher_tokens=256 if fisher else 0,
                                       types=("IQ2_XS", "Q2_K", "Q3_K", "Q4_K"))
    tools = stock_tools_dir()
    f16 = produce(work / "f16.gguf", lambda tmp: convert(args.model, tmp, "f16", progress=False))
    if args.stats:
        stats = load_stats(args.stats)
    else:
        stats_path = work / "stats.safetensors"
        if stats_path.exists():
            stats = load_stats(stats_path)
        else:
            calibrating = time.perf_counter()
            stats = calibrate(args.model, stats_path, read_text(args.calib), settings, progress=False)
            args.calibrate_s = time.perf_counter() - calibrating

    args.fisher_stats, stats = stats, replace(stats, fisher=None)  # compress's default weighs no error by it
    configs = [{"name": "F16", "family": "reference", "path": f16}]
    llama = llama_cpp_files(tools, f16, Path(args.calib), work, args)
    configs += llama
    if args.whole_file:
        configs += whole_files(args.model, stats, work, llama, args)
    else:
        configs += mc_gguf_files(args.model, stats, work, args)
    if args.autoround:
        configs += autoround_files(args.model, Path(args.calib), work, args)

    text = read_text(args.eval).text
    eval_settings = EvalSettings(n_ctx=args.ctx, max_windows=args.windows)
    rows = []
    for config in configs:
        report = evaluate_gguf(config["path"], text, ref=f16, settings=eval_settings, progress=False)
        path = config.pop("path")
        row = {**config, "file": path.name, "file_mb": path.stat().st_size / 1e6,
               "expert_bpw": inspect_gguf(path)["expert_bpw"],
               **{k: report[k] for k in ("ppl", "ppl_stderr", "kld_mean", "kld_stderr", "kld_p99", "same_top_token")},
               "skipped_share": report["expert_slots"]["skipped_share"]}
        rows.append(row)
        print(f"{row['name']:34s} {row['file_mb']:7.2f} MB  expert bpw {row['expert_bpw']:.3f}  PPL {row['ppl']:8.2f}"
              f"  KLD {row['kld_mean']:.5f}  top-1 {row['same_top_token']:.1%}  skipped {row['skipped_share']:.0%}",
              file=sys.stderr, flush=True)

    compared = [r for r in rows if r["family"] != "reference"]
    for row in compared:
        if row["family"] == "mc-gguf":
            best = kld_of_llama_cpp_at(compared, row["file_mb"])
            row["llama_cpp_kld_at_same_size"] = best
            row["kld_over_llama_cpp_at_same_size"] = row["kld_mean"] / best if best else None
            if "size_of" in row:
                recipe = next(r for r in compared if r["name"] == row["size_of"])
                row["kld_over_that_recipe"] = row["kld_mean"] / recipe["kld_mean"]
                row["bytes_over_that_recipe"] = row["file_mb"] / recipe["file_mb"]
            if args.autoround:
                peer = kld_of_llama_cpp_at(compared, row["file_mb"], families=("AutoRound",))
                row["kld_over_autoround_at_same_size"] = row["kld_mean"] / peer if peer else None
    report = {"model": args.model, "calib": str(args.calib), "eval": str(args.eval), "ctx": args.ctx,
              "windows": args.windows, "imatrix_chunks": args.imatrix_chunks,
              "stats": {k: stats.info.get(k) for k in ("text", "n_tokens", "seq_len")},
              "calibrate_s": round(args.calibrate_s, 1) if args.calibrate_s else None,
              "rows": rows,
              "llama_cpp_front": [r["name"] for r in pareto_front(
                  [r for r in compared if r["family"] in LLAMA_FAMILIES], "file_mb", "kld_mean")],
              "seconds": round(time.perf_counter() - started, 1)}
    emit_json(report, args.json, indent=1)
    if args.png and args.whole_file:
        plot_whole_file(compared, Path(args.png), f"whole files: KL divergence from F16 on {args.windows} windows "
                        f"of {args.ctx} tokens of {Path(args.eval).name}")
    elif args.png:
        plot(compared, Path(args.png), f"{args.model}: {args.windows} windows of {args.ctx} tokens of {args.eval}, KLD vs F16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
