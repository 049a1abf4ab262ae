"""mc-gguf odp-calibrate: per-layer pruning thresholds measured on text, written into a GGUF."""

from __future__ import annotations

import argparse

from mc_gguf.cli.common import MODEL_HELP, add_command, positive_int, unit_float
from mc_gguf.prune.settings import DEFAULT_RULE, THRESHOLD_RULES

EXAMPLE = "example: mc-gguf odp-calibrate ./Mixtral-8x7B-v0.1 mixtral-q4.gguf --text calib.txt --skip 0.25"


def add_parser(commands) -> None:
    p = add_command(commands, "odp-calibrate", "Choose per-layer Online Dynamic Pruning thresholds on calibration "
                    "text (thresholds on w1/w0 that skip the asked share of expert slots where skipping costs least) and write "
                    "them into a GGUF.",
                    EXAMPLE)
    p.add_argument("model_dir", help="the model the GGUF was made from: " + MODEL_HELP)
    p.add_argument("gguf", help="the GGUF to annotate")
    p.add_argument("--text", required=True, help="calibration text file (UTF-8)")
    p.add_argument("--skip", type=unit_float, default=0.25, help="share of expert slots to skip (default: 0.25)")
    p.add_argument("--rule", choices=THRESHOLD_RULES, default=DEFAULT_RULE,
                   help="sensitivity: a threshold per layer and expert, chosen by the measured cost of skipping the "
                   "slots routed to that expert (mc.odp.mu_exps); sensitivity-layer: a threshold per layer, each "
                   "layer's share chosen by that cost; quantile: the same quantile of w1/w0 in every layer, the "
                   f"paper's rule (default: {DEFAULT_RULE})")
    p.add_argument("--renormalize", action="store_true",
                   help="renormalise the weights a token keeps after pruning, as the paper does (mc.odp.renormalize); "
                   "by default they stay as the router gave them, so that a skipped slot's share of the output is "
                   "dropped rather than handed to the experts kept, which moves the output less, and a file that "
                   "only mc-gguf's runtime loads (per-expert layout) gets each expert's mean output, which a skipped "
                   "slot then adds instead of nothing (blk.N.ffn_odp_mean)")
    p.add_argument("--tokens", type=positive_int, default=8192, help="calibration tokens (default: 8192)")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per calibration sequence (default: 512)")
    p.add_argument("--protect-ratio", type=unit_float, default=0.02,
                   help="share of prompt tokens that keep all experts (default: 0.02)")
    p.add_argument("-o", "--output", help="write a copy here instead of updating GGUF in place")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from mc_gguf.calibrate.text import read_text
    from mc_gguf.prune.calibration import calibrate_odp

    text = read_text(args.text)
    out = args.output or args.gguf
    odp, shares = calibrate_odp(args.model_dir, text, args.gguf, out, args.skip, n_tokens=args.tokens,
                                seq_len=args.seq_len, protect_ratio=args.protect_ratio, rule=args.rule,
                                renormalize=args.renormalize)
    for il, share in enumerate(shares):
        if share is None:
            print(f"layer {il:3d}: dense FFN, no experts to skip")
        elif odp.mu_exps is not None:
            row = odp.mu_exps[il]
            print(f"layer {il:3d}: mu = {min(row):.4f} to {max(row):.4f} by expert, skips {share:.1%} of the "
                  "expert slots")
        else:
            print(f"layer {il:3d}: mu = {odp.mu[il]:.4f}, skips {share:.1%} of the expert slots")
    print(f"wrote mc.odp.* to {out}")
