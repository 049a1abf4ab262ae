"""mc-gguf odp-calibrate: per-layer pruning thresholds measured on text, written into a GGUF."""

from __future__ import annotations

import argparse

from mc_gguf.cli.common import add_command, positive_int, unit_float
from mc_gguf.prune.settings import DEFAULT_RULE, THRESHOLD_RULES

EXAMPLE = "example: mc-gguf odp-calibrate ./Mixtral-8x7B-v0.1 mixtral-q4.gguf --text calib.txt --skip 0.15"


def add_parser(commands) -> None:
    p = add_command(commands, "odp-calibrate", "Choose per-layer Online Dynamic Pruning thresholds on calibration "
                    "text (thresholds on w1/w0 that skip the asked share of expert slots where skipping costs least) and write "
                    "them into a GGUF.",
                    EXAMPLE)
    p.add_argument("model_dir", help="the Hugging Face model folder the GGUF was made from")
    p.add_argument("gguf", help="the GGUF to annotate")
    p.add_argument("--text", required=True, help="calibration text file (UTF-8)")
    p.add_argument("--skip", type=unit_float, default=0.15, help="share of expert slots to skip (default: 0.15)")
    p.add_argument("--rule", choices=THRESHOLD_RULES, default=DEFAULT_RULE,
                   help="sensitivity: each layer's share chosen by the measured cost of skipping its slots; quantile: "
                   f"the same quantile of w1/w0 in every layer, the paper's rule (default: {DEFAULT_RULE})")
    p.add_argument("--tokens", type=positive_int, default=8192, help="calibration tokens (default: 8192)")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per calibration sequence (default: 512)")
    p.add_argument("--protect-ratio", type=unit_float, default=0.02,
                   help="share of prompt tokens that keep all experts (default: 0.02)")
    p.add_argument("-o", "--output", help="write a copy here instead of updating GGUF in place")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import numpy as np

    from mc_gguf.calibrate.text import read_text
    from mc_gguf.prune.calibration import calibrate_odp

    text = read_text(args.text)
    out = args.output or args.gguf
    mu, ratios = calibrate_odp(args.model_dir, text, args.gguf, out, args.skip, n_tokens=args.tokens,
                               seq_len=args.seq_len, protect_ratio=args.protect_ratio, rule=args.rule)
    for il, (m, r) in enumerate(zip(mu, ratios)):
        if r is None:
            print(f"layer {il:3d}: dense FFN, no experts to skip")
            continue
        slots = (r < m).sum() / (r.shape[0] * (r.shape[1] + 1))
        print(f"layer {il:3d}: mu = {m:.4f}  (median w1/w0 {np.median(r[:, 0]):.3f}, skips {slots:.1%} of the "
              "expert slots)")
    print(f"wrote mc.odp.mu to {out}")
