#!/usr/bin/env python3
"""Mixed-precision experts against uniform expert types at equal non-expert precision.

On a trained model (default ../shared/bench) and its texts: the F16 GGUF is the
reference; every other file keeps attention, embeddings and output at Q8_0
and varies only the experts:
- llama.cpp's uniform expert types (IQ2_XXS, IQ2_XS, Q2_K, IQ3_XXS, Q3_K,
  Q4_K), quantized by ggml's quantizers with the same per-expert importance
  matrix, i.e. what `llama-quantize --imatrix ... --tensor-type
  "ffn_.*_exps=TYPE"` with the other tensors at q8_0 writes;
- mc-gguf at each --bits budget, per-expert and stock layouts, plain
  (imatrix) and GPTQ-compensated quantization, with the authors' cost
  exponents (alpha, beta, gamma = 1, 1.5, 1: `mc-gguf allocate`'s default) and
  with `mc-gguf compress`'s (0, 0, 2: the summed squared block-output error).
Each is scored like `llama-perplexity --kl-divergence` (windows of --ctx
tokens, second half scored): perplexity, mean KL divergence from the F16
file, top-1 agreement; plus greedy decoding speed of the per-expert file
against the stock file of the same budget, measured in the same run.
Prints one JSON object (and writes it to --json).

    python scripts/bench_compress.py [--bits 2.5] [--stats STATS]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench_common import add_input_flags, add_output_flags, add_window_flags, emit_json
from bench_odp import decode_tokens_per_second

from mc_gguf.allocate.allocation import allocate, uniform_plan
from mc_gguf.allocate.cost import AUTHORS_COST, COMPRESS_COST
from mc_gguf.calibrate.calibration import CalibrationSettings, calibrate
from mc_gguf.calibrate.stats import load_stats
from mc_gguf.calibrate.text import read_text
from mc_gguf.evaluate.perplexity import reference_logits, score, windows
from mc_gguf.loader.model import load
from mc_gguf.gguf_io.convert import convert
from mc_gguf.hf.checkpoint import open_checkpoint
from mc_gguf.quantize.quantization import quantize

UNIFORM = ("IQ2_XXS", "IQ2_XS", "Q2_K", "IQ3_XXS", "Q3_K", "Q4_K")
Q8_NON_EXPERT = {"token_embd": "Q8_0", "output": "Q8_0", "attn": "Q8_0"}
# cost exponents (alpha, beta, gamma): allocate's default, compress's default
COSTS = {"authors": AUTHORS_COST, "sq-error": COMPRESS_COST}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_flags(parser)
    parser.add_argument("--stats", help="statistics with Hessians from `mc-gguf calibrate --hessian` "
                        "(default: calibrate here)")
    parser.add_argument("--bits", type=float, nargs="+", default=[2.5], help="mc-gguf budgets (default: 2.5)")
    parser.add_argument("--types", nargs="+", help="mc-gguf candidate types (default: all calibrated)")
    parser.add_argument("--uniform", nargs="*", default=list(UNIFORM), help="uniform expert types to compare")
    add_window_flags(parser)
    parser.add_argument("--decode-tokens", type=int, default=128, help="tokens per decode timing (default: 128)")
    add_output_flags(parser, "build/bench-compress")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.stats:
        stats = load_stats(args.stats)
    else:
        stats = calibrate(args.model, work / "stats.safetensors", read_text(args.calib),
                          CalibrationSettings(hessian=True))
    ckpt = open_checkpoint(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer(Path(args.eval).read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    token_windows = windows(ids, args.ctx, tokenizer.bos_token_id, args.windows)

    f16 = convert(args.model, work / "f16.gguf", "f16", progress=False)
    reference = reference_logits(load(f16, odp=False, n_ctx=args.ctx, n_batch=args.ctx, logits_all=True),
                                 token_windows)

    configs = []  # (name, plan, gptq)
    for name in args.uniform:
        configs.append((f"uniform {name}", uniform_plan(ckpt, name, Q8_NON_EXPERT), False))
    for bits in args.bits:
        for layout in ("per-expert", "stock"):
            for cost_name, cost in COSTS.items():
                plan = allocate(stats, bits, model_dir=args.model, layout=layout, types=args.types,
                                 non_expert=Q8_NON_EXPERT, **cost)
                configs.append((f"mc {layout} {bits} {cost_name}", plan, False))
                configs.append((f"mc {layout} {bits} {cost_name} gptq", plan, True))

    rows = []
    for name, plan, gptq in configs:
        path = work / (name.replace(" ", "-") + ".gguf")
        quantize(args.model, plan, path, stats=stats, gptq=gptq, progress=False)
        llm = load(path, odp=False, n_ctx=args.ctx, n_batch=args.ctx, logits_all=True)
        for result in score(llm, token_windows, reference):
            pass
        row = {"name": name, "file_mb": path.stat().st_size / 1e6, "expert_bpw": plan.predicted["expert_bpw"],
               "gptq": gptq, **result.summary()}
        rows.append(row)
        print(f"{name:28s} {row['file_mb']:6.2f} MB  expert bpw {row['expert_bpw']:.3f}  PPL {row['ppl']:7.2f}  "
              f"KLD {row['kld_mean']:.5f}  top-1 {row['same_top_token']:.1%}", file=sys.stderr)
        del llm

    speed = {}
    prompt = token_windows[0][:64]
    for bits in args.bits:
        # the files compress writes by default (its cost exponents, no GPTQ), per-expert against stock
        per_expert = work / f"mc-per-expert-{bits}-sq-error.gguf"
        stock = work / f"mc-stock-{bits}-sq-error.gguf"
        a = decode_tokens_per_second(per_expert, prompt, args.decode_tokens)
        b = decode_tokens_per_second(stock, prompt, args.decode_tokens)
        speed[str(bits)] = {"per_expert": a, "stock": b, "ratio": a["median"] / b["median"]}

    report = {"model": args.model, "eval": args.eval, "ctx": args.ctx, "windows": len(token_windows),
              "calibration": {k: stats.info.get(k) for k in ("text", "n_tokens", "seq_len")},
              "f16_mb": f16.stat().st_size / 1e6, "rows": rows, "decode_speed": speed,
              "seconds": round(time.perf_counter() - started, 1)}
    emit_json(report, args.json, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
