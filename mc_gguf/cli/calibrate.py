"""mc-gguf calibrate: per-expert statistics of a checkpoint on calibration text."""

from __future__ import annotations

import argparse
import time

from mc_gguf.calibrate.settings import CalibrationSettings
from mc_gguf.cli.common import (MODEL_HELP, add_command, add_device_flag, add_eps_features_argument, add_ray_flag,
                                non_negative_int, positive_int, type_name)
from mc_gguf.ggml.types import CANDIDATES

EXAMPLE = ("example: mc-gguf calibrate ./Mixtral-8x7B-v0.1 --text calib.txt -o mixtral.stats\n"
           "         mc-gguf calibrate ./Mixtral-8x7B-v0.1 -o mixtral.stats   (default text: Python's docs)")


def add_parser(commands) -> None:
    defaults = CalibrationSettings()
    p = add_command(commands, "calibrate", "Run a Hugging Face MoE checkpoint on calibration text, one decoder layer "
                    "in memory at a time, and measure per-expert statistics: activation frequency, routing weight, "
                    "w1/w0 ratios, importance matrices, and the output error of every expert at every candidate GGUF "
                    "type. Resumable: an interrupted run continues from its last finished layer.", EXAMPLE)
    p.add_argument("model_dir", help=MODEL_HELP)
    p.add_argument("-o", "--output", required=True, help="statistics file to write (safetensors + JSON header)")
    p.add_argument("--text", help="calibration text, UTF-8 (default: the Python documentation shipped with "
                   "CPython, generic English prose with code; text from your domain calibrates better)")
    p.add_argument("--tokens", type=positive_int, default=defaults.n_tokens,
                   help=f"calibration tokens (default: {defaults.n_tokens}; the paper used 262144)")
    p.add_argument("--seq-len", type=positive_int, default=defaults.seq_len,
                   help=f"tokens per sequence, at most the model's context (default: {defaults.seq_len})")
    p.add_argument("--seed", type=int, default=defaults.seed, help="which windows of the text are used (default: 0)")
    p.add_argument("--eps-tokens", type=positive_int, default=defaults.eps_tokens,
                   help=f"sampled tokens on which quantization errors are measured (default: {defaults.eps_tokens})")
    add_eps_features_argument(p, defaults.eps_features, defaults.eps_iquant_share)
    p.add_argument("--types", nargs="+", type=type_name, default=list(CANDIDATES), metavar="TYPE",
                   help=f"candidate GGUF types (default: all of {' '.join(CANDIDATES)})")
    p.add_argument("--hessian", action="store_true",
                   help="also keep what the experts' Hessians are built from for --gptq and --tune: every "
                        "calibration token's MoE-block input, its experts and their weights, tokens*H*4 bytes per "
                        "layer, e.g. 1.07 GB per layer (34 GB in all) for Mixtral 8x7B at 65536 tokens, 67 MB per "
                        "layer for hidden 256; and each attention linear's and the output head's input Hessian "
                        "(n*n*4 bytes: 256 MB per layer for Mixtral 8x7B), on which they are tuned too")
    p.add_argument("--fisher-tokens", type=non_negative_int, default=defaults.fisher_tokens, metavar="N",
                   help="tokens (the first sequences) on which the gradient is taken back through the layers to "
                        "measure the Fisher information of every layer, which prices each error by how much the "
                        "output feels a change at its depth (e.g. 4096; default: 0, every error counts alike)")
    add_device_flag(p, "the layer forward and the error pass's products")
    add_ray_flag(p, "measure the experts' errors (an expert per task, while this machine runs the next layer)",
                 output="the statistics file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from mc_gguf.calibrate.calibration import calibrate
    from mc_gguf.calibrate.text import read_text
    from mc_gguf.ggml.types import quant_type

    settings = CalibrationSettings(n_tokens=args.tokens, seq_len=args.seq_len, seed=args.seed,
                                   eps_tokens=args.eps_tokens, eps_features=args.eps_features,
                                   eps_iquant_share=args.eps_iquant_share, hessian=args.hessian,
                                   types=tuple(quant_type(t).name for t in args.types),
                                   fisher_tokens=args.fisher_tokens, device=args.device)
    started = time.perf_counter()
    stats = calibrate(args.model_dir, args.output, read_text(args.text), settings, progress=not args.quiet,
                      ray=args.ray)
    print(f"wrote {args.output}: {stats.info['n_tokens']} tokens ({stats.info['n_sequences']} x "
          f"{stats.info['seq_len']}) of {stats.info['text']}, {len(stats.types)} candidate types, "
          f"in {time.perf_counter() - started:.0f} s")
