"""mc-gguf eval: perplexity, KL divergence from a reference, and expert slots, as llama-perplexity measures them."""

from __future__ import annotations

import argparse

from mc_gguf.cli.common import add_command, add_llama_flags, llama_load_kwargs, positive_int, unit_float

EXAMPLE = ("example: mc-gguf eval mixtral-mc2.5.gguf --text wiki.test.raw --ref mixtral-f16.gguf\n"
           "         mc-gguf eval mixtral-mc2.5.gguf --text wiki.test.raw --no-odp --json > scores.json")


def add_parser(commands) -> None:
    p = add_command(commands, "eval", "Perplexity of a GGUF on a text the way llama-perplexity measures it "
                    "(non-overlapping windows, the second half of each scored), with --ref the KL divergence from a "
                    "reference GGUF and top-1 agreement (as llama-perplexity --kl-divergence), and the expert slots "
                    "computed and skipped.", EXAMPLE)
    add_llama_flags(p, "window length in tokens, each window its own context (default: 512)", ctx_default=512,
                    model_help="GGUF file to evaluate")
    p.add_argument("--text", required=True, help="evaluation text file (UTF-8)")
    p.add_argument("--ref", help="reference GGUF with the same vocabulary, e.g. the F16 file (loaded with the "
                   "same flags)")
    p.add_argument("--chunks", type=positive_int, help="evaluate at most this many windows (default: all the text gives)")
    p.add_argument("--odp", action=argparse.BooleanOptionalAction, default=True,
                   help="Online Dynamic Pruning as the file says, or off (default: --odp)")
    p.add_argument("--mu", type=unit_float, help="one pruning threshold for every layer, in [0, 1]")
    p.add_argument("--per-layer", action="store_true", help="also show expert slots per layer")
    p.add_argument("--json", action="store_true", help="print one JSON object with every figure and the settings")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import json

    from mc_gguf.calibrate.text import read_text
    from mc_gguf.evaluate.perplexity import EvalSettings, describe_eval, evaluate_gguf

    text = read_text(args.text).text
    settings = EvalSettings(max_windows=args.chunks, odp=args.odp, mu=args.mu, **llama_load_kwargs(args))
    report = evaluate_gguf(args.model, text, ref=args.ref, settings=settings, progress=not args.json)
    print(json.dumps(report, indent=1) if args.json else describe_eval(report, per_layer=args.per_layer))
