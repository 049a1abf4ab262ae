#!/usr/bin/env python3
"""Online Dynamic Pruning on a trained model: what each threshold rule costs for a share of skipped expert slots.

One calibration pass on the calibration text measures every token's w1/w0 and
skip cost (prune/budget.py); from it each rule chooses thresholds for each
skip share: ``quantile`` (the same w1/w0 quantile in every layer, the paper's
rule), ``sensitivity-layer`` (per-layer shares chosen by the measured cost)
and ``sensitivity`` (one threshold per layer and expert by that cost), each
with the weights a token keeps left as they are (odp-calibrate's default)
and renormalised (the paper's rule, marked "renormalised"); left as they are,
in a file that can carry them (the per-expert layout), with the experts'
mean outputs added for the skipped slots (prune/means.py) and "without
means". Each
choice is written into a copy of the file and evaluated the llama-perplexity
way on the evaluation text (windows of --ctx tokens, second half scored), and
apart on the windows after those (--held-out-windows, a second text neither
the calibration nor the choices saw):
perplexity against the same file unpruned (measured in the same run), KL
divergence from it (mean and p99), how often the top token is the same, the
skipped share per layer, and greedy decoding speed. Done on the F16 file and,
unless --no-quantized, on a per-expert 2.5-bit file made by `compress` with
its defaults (tuned; --no-tune: ggml's quantizer).
The bench model is too small for its decoding to be bound by memory
bandwidth, where a skipped slot is an expert's bytes not read; unless
--no-speed-model, the decode speed at each skip share is also measured on
bench_speed.py's bandwidth-bound synthetic Mixtral (paired with its
unpruned decode in one process, against the bandwidth limit's own ratio).
Prints one JSON object.

    python scripts/bench_odp.py [--model ../shared/bench/model] [--calib ...] [--eval ...] [--skips 0.15 0.25 0.35]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from bench_common import add_input_flags, add_output_flags, add_window_flags, emit_json

from mc_gguf.calibrate.text import read_text
from mc_gguf.evaluate.perplexity import reference_logits, score, windows
from mc_gguf.loader.model import load
from mc_gguf.gguf_io.convert import convert
from mc_gguf.gguf_io.header import scan
from mc_gguf.prune.calibration import odp_from_stats, router_statistics, write_odp_metadata
from mc_gguf.prune.means import carries_means, mean_tensors
from mc_gguf.prune.settings import THRESHOLD_RULES


def text_windows(tokenizer, path: str, ctx: int, count: int) -> list[list[int]]:
    """The first ``count`` windows of ``ctx`` token ids of the text file, each starting with BOS (the tokenizer run
    without special tokens, so both engines get the same ids: ../shared/bench/README.md's tokenizer quirk)."""
    ids = tokenizer(Path(path).read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    return windows(ids, ctx, tokenizer.bos_token_id, count)


def decode_tokens_per_second(path: Path, prompt: list[int], n_tokens: int, repeats: int = 5) -> dict:
    """Greedy decoding speed (tokens/s after the prompt), median of several runs on one context."""
    llm = load(path, n_ctx=512, n_batch=64)
    speeds = []
    for _ in range(repeats):
        llm.reset()
        llm.eval(prompt)
        started = time.perf_counter()
        for _, token in zip(range(n_tokens), llm.generate([], temp=0.0, reset=False)):
            pass
        speeds.append(n_tokens / (time.perf_counter() - started))
    return {"median": float(np.median(speeds)), "runs": [round(v, 1) for v in speeds], "tokens": n_tokens}


def evaluate_rules(base_path: Path, stats, texts: dict[str, list[list[int]]], args, workdir: Path) -> dict:
    """Every rule at every skip share on ``base_path``, against the same file unpruned, on each set of windows
    (``texts``: the evaluation windows, and the held-out ones after them)."""
    settings = dict(n_ctx=args.ctx, n_batch=args.ctx, logits_all=True)
    base_llm = load(base_path, odp=False, **settings)
    references, bases = {}, {}
    for label, token_windows in texts.items():
        references[label] = reference_logits(base_llm, token_windows)
        *_, base = score(base_llm, token_windows)
        bases[label] = base.summary()
    del base_llm
    rows = {}
    names = {}  # the file of every method at the middle share, for the decode timing
    header = scan(base_path)
    can_carry = carries_means(header.architecture or "", (t.name for t in header.tensors))
    for rule, renormalize, means in methods(args, can_carry):
        name = f"{rule}{' renormalised' if renormalize else ''}{' without means' if can_carry and not means else ''}"
        for skip in args.skips:
            odp = odp_from_stats(stats, skip, rule=rule, renormalize=renormalize)
            written_means = mean_tensors(stats, odp) if means else []
            pruned = write_odp_metadata(base_path, workdir / f"{base_path.stem}-{name.replace(' ', '-')}-{skip:g}.gguf",
                                        odp, written_means)
            if skip == args.skips[len(args.skips) // 2]:
                names[name] = pruned
            llm = load(pruned, **settings)
            row = {"rule": rule, "renormalize": renormalize, "means": bool(written_means),
                   "target_skip": skip,
                   "mu_per_layer": [round(m, 4) for m in odp.mu],
                   **({"mu_per_expert": [[round(m, 4) for m in row] for row in odp.mu_exps]} if odp.mu_exps else {})}
            for label, token_windows in texts.items():
                llm.reset_expert_stats()
                *_, result = score(llm, token_windows, reference=references[label])
                counts = llm.expert_stats()
                summary = result.summary()
                row[label] = {
                    "skipped_share": counts.skipped_share, "ppl": summary["ppl"],
                    "ppl_change": summary["ppl"] / bases[label]["ppl"] - 1,
                    "kld_mean": summary["kld_mean"], "kld_p99": summary["kld_p99"],
                    "same_top_token": summary["same_top_token"],
                    "skipped_share_per_layer": [round(s / (s + c), 4) if s + c else 0.0
                                                for s, c in zip(counts.skipped, counts.computed)]}
                print(f"{base_path.name} {name} {skip:g} ({label}): skipped {counts.skipped_share:.3f}, "
                      f"ppl {row[label]['ppl_change']:+.2%}, kld {summary['kld_mean']:.5f}",
                      file=sys.stderr, flush=True)
            rows[f"{name} {skip:g}"] = row
            del llm
    first_windows = texts["eval"][0][:64]
    decode = {"unpruned": decode_tokens_per_second(base_path, first_windows, args.decode_tokens)}
    for path in names.values():
        decode[path.stem] = decode_tokens_per_second(path, first_windows, args.decode_tokens)
    return {"unpruned": bases, "rules": rows, "decode_tokens_per_second": decode}


def methods(args, can_carry: bool) -> list[tuple[str, bool, bool]]:
    """(rule, renormalize, means) of every row: each rule with the kept weights as they are and renormalised;
    as they are, in a file that can carry them, with the experts' mean outputs (prune/means.py) and without."""
    return [(rule, renormalize, means) for renormalize in args.renormalize for rule in args.rules
            for means in ((True, False) if can_carry and not renormalize else (False,))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_flags(parser)
    add_window_flags(parser)
    parser.add_argument("--first-window", type=int, default=0,
                        help="skip this many windows of the evaluation text first, to score others (default: 0)")
    parser.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens (default: 16384)")
    parser.add_argument("--skips", type=float, nargs="+", default=[0.15, 0.25, 0.35],
                        help="target skip shares of slots (default: 0.15 0.25 0.35)")
    parser.add_argument("--rules", nargs="+", choices=THRESHOLD_RULES, default=list(THRESHOLD_RULES))
    parser.add_argument("--renormalize", nargs="+", choices=["no", "yes"], default=["no", "yes"],
                        help="the kept weights as they are (no, the default of odp-calibrate) and renormalised (yes, "
                        "the paper's rule) (default: both)")
    parser.add_argument("--held-out-windows", type=int, default=32,
                        help="windows after the evaluation windows, scored apart as a second unseen text (default: 32)")
    parser.add_argument("--bits", type=float, default=2.5, help="expert bits of the quantized file (default: 2.5)")
    parser.add_argument("--no-tune", action="store_true",
                        help="the quantized file by ggml's quantizer and the authors' cost (the README's first ODP "
                        "table), instead of compress's defaults")
    parser.add_argument("--no-quantized", action="store_true", help="only the F16 file")
    parser.add_argument("--decode-tokens", type=int, default=128, help="tokens per decode timing (default: 128)")
    parser.add_argument("--no-speed-model", action="store_true",
                        help="skip the decode speed on bench_speed.py's bandwidth-bound synthetic model")
    parser.add_argument("--speed-workdir", default="build/bench-speed",
                        help="where that model's files go (shared with bench_speed.py)")
    add_output_flags(parser, "build/bench-odp")
    args = parser.parse_args()
    args.renormalize = [choice == "yes" for choice in args.renormalize]

    from transformers import AutoTokenizer

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    calib = read_text(args.calib)
    started = time.perf_counter()
    stats = router_statistics(args.model, calib, workdir, n_tokens=args.calib_tokens, seq_len=args.ctx)
    calib_seconds = time.perf_counter() - started

    # the same token ids for both engines (see ../shared/bench/README.md on the tokenizer quirk)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    every = text_windows(tokenizer, args.eval, args.ctx, args.first_window + args.windows + args.held_out_windows)
    texts = {"eval": every[args.first_window:args.first_window + args.windows]}
    if args.held_out_windows:
        texts["held_out"] = every[args.first_window + args.windows:]

    files = {"f16": convert(args.model, workdir / "model-f16.gguf", "f16", progress=False)}
    if not args.no_quantized:
        from mc_gguf.allocate.settings import AllocateSettings
        from mc_gguf.pipeline import compress
        from mc_gguf.settings import CompressSettings

        # compress's defaults, or (--no-tune) ggml's quantizer and the authors' cost
        settings = CompressSettings(tune=None, allocation=AllocateSettings()) if args.no_tune else CompressSettings()
        files[f"per-expert {args.bits:g}"] = compress(args.model, workdir / f"model-{args.bits:g}.gguf", args.bits,
                                                      calib, settings=settings, progress=False).path
    result = {
        "model": str(args.model), "windows": len(texts["eval"]),
        "held_out_windows": len(texts.get("held_out", [])), "first_window": args.first_window, "ctx": args.ctx,
        "calibration_tokens": int(stats.info["n_tokens"]), "calibration_seconds": round(calib_seconds, 1),
        "calibration_median_w1_w0": [round(float(np.median(layer.top_ratio[:, 0])), 4) for layer in stats.layers],
        "files": {label: evaluate_rules(path, stats, texts, args, workdir) for label, path in files.items()},
    }
    if not args.no_speed_model:
        from bench_speed import odp_speed

        result["bandwidth_bound_decode"] = odp_speed(Path(args.speed_workdir), args.skips)
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
