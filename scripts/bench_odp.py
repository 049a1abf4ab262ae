#!/usr/bin/env python3
"""Online Dynamic Pruning on a trained model: skipped share of expert slots and the perplexity it costs.

Converts the model to F16 GGUF, sets each layer's mu to the calibration median of
w1/w0 (so about half the tokens drop their second expert: a 25% skip share with
top-2), and evaluates perplexity on the evaluation text the llama-perplexity way
(windows of --ctx tokens, second half scored), without pruning (the baseline,
measured in the same run) and with it, plus the KL divergence of the pruned
model from the unpruned one, and greedy decoding speed of both (medians of
5 runs on this machine, same run). Prints one JSON object.

    python scripts/bench_odp.py [--model ../shared/bench/model] [--calib ...calib.txt] [--eval ...eval.txt]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from mc_gguf.calibrate.text import read_text
from mc_gguf.evaluate.perplexity import reference_logits, score, windows
from mc_gguf.evaluate.run import load
from mc_gguf.gguf_io.convert import convert
from mc_gguf.prune.calibration import calibrate_odp

BENCH = Path(__file__).resolve().parent.parent.parent / "shared" / "bench"


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(BENCH / "model"), help="Hugging Face model folder")
    parser.add_argument("--calib", default=str(BENCH / "calib.txt"), help="calibration text")
    parser.add_argument("--eval", default=str(BENCH / "eval.txt"), help="evaluation text")
    parser.add_argument("--ctx", type=int, default=512, help="window length (default: 512)")
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows (default: 16)")
    parser.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens (default: 16384)")
    parser.add_argument("--skip", type=float, default=0.25, help="target skip share of slots (default: 0.25)")
    parser.add_argument("--decode-tokens", type=int, default=128, help="tokens per decode timing (default: 128)")
    parser.add_argument("--workdir", default="build/bench-odp", help="where the GGUF files go")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    plain = convert(args.model, workdir / "model-f16.gguf", "f16", progress=False)

    started = time.perf_counter()
    pruned = workdir / "model-f16-odp.gguf"
    mu, ratios = calibrate_odp(args.model, read_text(args.calib), plain, pruned, args.skip,
                               n_tokens=args.calib_tokens, seq_len=args.ctx)
    calib_seconds = time.perf_counter() - started

    # the same token ids for both engines (see ../shared/bench/README.md on the tokenizer quirk)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer(Path(args.eval).read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    token_windows = windows(ids, args.ctx, tokenizer.bos_token_id, args.windows)

    settings = dict(n_ctx=args.ctx, n_batch=args.ctx, logits_all=True)
    base_llm = load(plain, **settings)
    odp_llm = load(pruned, **settings)
    *_, base = score(base_llm, token_windows)
    *_, odp = score(odp_llm, token_windows, reference=reference_logits(base_llm, token_windows))
    base_stats, odp_stats = base_llm.expert_stats(), odp_llm.expert_stats()

    decode = {label: decode_tokens_per_second(path, token_windows[0][:64], args.decode_tokens)
              for label, path in (("baseline", plain), ("odp", pruned))}

    base_summary, odp_summary = base.summary(), odp.summary()
    result = {
        "model": str(args.model),
        "windows": len(token_windows),
        "ctx": args.ctx,
        "mu_per_layer": [round(m, 4) for m in mu],
        "calibration_median_w1_w0": [round(float(np.median(r)), 4) for r in ratios],
        "calibration_seconds": round(calib_seconds, 1),
        "baseline": {**base_summary, "slots_skipped_share": base_stats.skipped_share},
        "odp": {**odp_summary, "slots_skipped_share": odp_stats.skipped_share,
                "skipped_share_per_layer": [round(s / (s + c), 4) if s + c else 0.0
                                            for s, c in zip(odp_stats.skipped, odp_stats.computed)]},
        "ppl_ratio_odp_over_baseline": odp_summary["ppl"] / base_summary["ppl"],
        "decode_tokens_per_second": decode,
        "decode_speed_ratio_odp_over_baseline": decode["odp"]["median"] / decode["baseline"]["median"],
    }
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
