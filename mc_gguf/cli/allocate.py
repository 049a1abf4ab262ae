"""mc-gguf allocate | plan-show: a plan from calibration statistics, and a plan shown to a person."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mc_gguf.allocate.cost import AUTHORS_COST
from mc_gguf.allocate.plan import LAYOUTS, SCOPES
from mc_gguf.cli.common import (MAX_TYPES_HELP, add_budget_flags, add_command, add_cost_arguments,
                                add_tensor_type_flag, parse_non_expert, positive_int, type_name)
from mc_gguf.errors import InvalidValueError

EXAMPLE = ("example: mc-gguf allocate mixtral.stats --bits 2.5 -o plan.json\n"
           "         mc-gguf allocate mixtral.stats --bits 3 --layout stock -o plan-stock.json\n"
           "         mc-gguf allocate mixtral.stats --bits 2.5 --per-layer --types IQ2_XXS Q2_K IQ3_XXS -o paper.json")


def add_parsers(commands) -> None:
    p = add_command(commands, "allocate", "Choose a GGUF type for every expert under a bits-per-weight budget: an "
                    "integer program (HiGHS) minimising the summed cost phi^alpha * w^beta * eps^gamma of the "
                    "choices.", EXAMPLE)
    p.add_argument("stats", help="statistics from `mc-gguf calibrate`")
    add_budget_flags(p, "average bits per weight over the scope, counted in real bytes (scales included)")
    p.add_argument("-o", "--output", required=True, help="plan file to write (JSON)")
    p.add_argument("--scope", choices=SCOPES, default="experts",
                   help="what the budget averages over: the expert tensors, or every tensor of the file (default: experts)")
    p.add_argument("--layout", choices=LAYOUTS, default="per-expert",
                   help="per-expert: a type per expert (needs the mc-gguf runtime); stock: one type per layer and "
                        "projection, loads in unmodified llama.cpp (default: per-expert)")
    p.add_argument("--types", nargs="+", type=type_name, metavar="TYPE", help="candidate types (default: all in the statistics)")
    p.add_argument("--per-layer", action="store_true", help="the paper's form: the budget holds in every layer, "
                   "with at least one expert below and one at or above it")
    p.add_argument("--per-projection", action="store_true",
                   help="a type for gate+up and another for down (errors treated as additive)")
    p.add_argument("--max-types", type=positive_int, metavar="N", help=MAX_TYPES_HELP)
    add_cost_arguments(p, AUTHORS_COST, "as the authors' code; the paper writes 2")
    add_tensor_type_flag(p)
    p.add_argument("--error-scale", metavar="TUNED.json", help="multiply each type's measured errors by its ratio "
                   "from `mc-gguf tuned-errors` (what compress does when it tunes); the file must be measured on "
                   "these statistics")
    p.add_argument("--model", help="the model folder, if it moved since calibration")
    p.set_defaults(func=run_allocate)


def add_show_parser(commands) -> None:
    p = add_command(commands, "plan-show", "Show a plan: types per layer, bits per weight, predicted size; "
                    "optionally a heat map of the bits of every expert.",
                    "example: mc-gguf plan-show plan.json --plot allocation.png")
    p.add_argument("plan", help="plan file from `mc-gguf allocate`")
    p.add_argument("--plot", help="write a heat map (layers x experts) to this PNG")
    p.set_defaults(func=run_show)


def run_allocate(args: argparse.Namespace) -> None:
    from mc_gguf.allocate.allocation import allocate
    from mc_gguf.allocate.plan import validate_plan
    from mc_gguf.allocate.show import describe_plan
    from mc_gguf.atomic import check_output_path
    from mc_gguf.calibrate.stats import load_stats

    non_expert = parse_non_expert(args.tensor_type)
    check_output_path(args.output)
    stats = load_stats(args.stats)
    error_scale = _error_scale(args.error_scale, stats) if args.error_scale else None
    started = time.perf_counter()
    plan = allocate(stats, args.bits, size=args.size, model_dir=args.model, layout=args.layout, scope=args.scope,
                    per_layer=args.per_layer, per_projection=args.per_projection, types=args.types,
                    alpha=args.alpha, beta=args.beta, gamma=args.gamma,
                    non_expert=non_expert, stats_path=str(Path(args.stats).resolve()),
                    max_types=args.max_types, error_scale=error_scale)
    validate_plan(plan)
    plan.save(args.output)
    print(describe_plan(plan))
    print(f"wrote {args.output} (solved in {time.perf_counter() - started:.1f} s)")


def _error_scale(path: str, stats) -> dict[str, float]:
    """The ratios of a tuned-errors file, refused when it was measured on other statistics."""
    from mc_gguf.quantize.tuned_errors import load_tuned_errors

    measured = load_tuned_errors(path)
    ours = {"types": list(stats.types), "text_sha256": stats.info.get("text_sha256")}
    theirs = {k: measured.key.get(k) for k in ours}
    if theirs != ours:
        raise InvalidValueError(f"{path} was measured on other statistics (types {theirs['types']}, text "
                                f"{str(theirs['text_sha256'])[:12]}) than {stats.path} (types {ours['types']}, "
                                f"text {str(ours['text_sha256'])[:12]}): run `mc-gguf tuned-errors` on these")
    return measured.ratios


def run_show(args: argparse.Namespace) -> None:
    from mc_gguf.allocate.plan import load_plan
    from mc_gguf.allocate.show import describe_plan, plot_plan
    from mc_gguf.atomic import check_output_path

    if args.plot:
        check_output_path(args.plot)
    plan = load_plan(args.plan)
    print(describe_plan(plan))
    if args.plot:
        plot_plan(plan, args.plot, title=Path(args.plan).name)
        print(f"wrote {args.plot}")
