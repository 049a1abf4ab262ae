"""mc-gguf bench: prompt and generation speed of a GGUF, with and without pruning, in llama-bench's shape."""

from __future__ import annotations

import argparse
import sys

from mc_gguf.cli.common import add_command, add_llama_flags, llama_load_kwargs, non_negative_int, positive_int, \
    unit_float
from mc_gguf.evaluate.bench import BenchSettings

DEFAULTS = BenchSettings()
FORMATS = ("md", "json", "jsonl", "csv")


def add_parser(commands) -> None:
    p = add_command(commands, "bench", "Prompt (ppN) and generation (tgN) speed of a GGUF as llama-bench measures "
                    "them (random tokens on an empty context, a warm-up run, then -r timed runs: mean and standard "
                    "deviation of tokens per second), once with pruning off and once on (the file's thresholds, or "
                    "--mu), with the share of expert slots skipped and the most skipping can give where memory "
                    "bandwidth bounds generation (the bytes a token reads, unpruned over pruned).",
                    "example: mc-gguf bench mixtral-mc2.5.gguf\n"
                    "         mc-gguf bench mixtral-mc2.5.gguf -p 512,1024 -n 128 -r 3 -o json > speed.json")
    add_llama_flags(p, "tokens the context holds (default: the largest test's, as llama-bench)",
                    model_help="GGUF file to measure")
    p.add_argument("-p", "--n-prompt", type=counts, default=DEFAULTS.n_prompt, metavar="N[,N...]",
                   help=f"prompt tokens of each ppN test, 0 for none (default: {_listed(DEFAULTS.n_prompt)})")
    p.add_argument("-n", "--n-gen", type=counts, default=DEFAULTS.n_gen, metavar="N[,N...]",
                   help=f"generated tokens of each tgN test, 0 for none (default: {_listed(DEFAULTS.n_gen)})")
    p.add_argument("-r", "--repetitions", type=positive_int, default=DEFAULTS.repetitions, metavar="N",
                   help=f"timed runs of each test (default: {DEFAULTS.repetitions})")
    p.add_argument("-b", "--batch-size", type=positive_int, default=DEFAULTS.n_batch, metavar="N",
                   help=f"prompt tokens per decode call (default: {DEFAULTS.n_batch})")
    p.add_argument("-ub", "--ubatch-size", type=positive_int, default=DEFAULTS.n_ubatch, metavar="N",
                   help=f"tokens per compute graph (default: {DEFAULTS.n_ubatch})")
    p.add_argument("--odp", type=switches, metavar="0|1|0,1",
                   help="pruning off (0), on (1) or both in turn (default: both when the file has thresholds or "
                   "--mu is given, off otherwise)")
    p.add_argument("--mu", type=unit_float, help="one pruning threshold for every layer, in [0, 1] (default: the "
                   "file's mc.odp.mu)")
    p.add_argument("-s", "--seed", type=non_negative_int, default=DEFAULTS.seed,
                   help=f"seed of the random tokens (default: {DEFAULTS.seed})")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed warm-up runs")
    p.add_argument("-o", "--output", choices=FORMATS, default="md",
                   help="md: llama-bench's table; json: a list of objects with llama-bench's fields and the "
                   "pruning figures; jsonl: one object per line; csv (default: md)")
    p.add_argument("--progress", action="store_true", help="name each test on stderr as it starts")
    p.set_defaults(func=run)


def counts(text: str) -> tuple[int, ...]:
    """llama-bench's lists: N or N,N,... (each 0 or more)."""
    return tuple(non_negative_int(part) for part in text.split(","))


def switches(text: str) -> tuple[bool, ...]:
    values = text.split(",")
    if not values or any(v not in ("0", "1") for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give 0, 1 or 0,1")
    return tuple(dict.fromkeys(v == "1" for v in values))


def _listed(values: tuple[int, ...]) -> str:
    return ",".join(str(v) for v in values)


def run(args: argparse.Namespace) -> None:
    from mc_gguf.evaluate.bench import bench
    from mc_gguf.evaluate.bench_report import describe, write_rows

    load_options = llama_load_kwargs(args)
    n_ctx = load_options.pop("n_ctx")
    settings = BenchSettings(n_prompt=args.n_prompt, n_gen=args.n_gen, repetitions=args.repetitions,
                             n_batch=args.batch_size, n_ubatch=args.ubatch_size, odp=args.odp, mu=args.mu,
                             seed=args.seed, warmup=args.warmup, n_ctx=n_ctx, load_options=load_options)
    settings.check()  # before the model loads

    def show(test: str) -> None:
        print(f"bench: {test}", file=sys.stderr, flush=True)

    report = bench(args.model, settings, progress=show if args.progress else None)
    if args.output == "md":
        print(describe(report))
    else:
        write_rows(report, args.output, sys.stdout)
