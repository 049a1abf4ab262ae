"""mc-gguf compress: the whole pipeline (pipeline.py) in one command."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from mc_gguf.allocate.plan import LAYOUTS
from mc_gguf.cli.common import (
    MODEL_HELP,
    MAX_TYPES_HELP,
    add_command,
    add_cost_arguments,
    add_device_flag,
    add_budget_flags,
    add_tensor_type_flag,
    add_ray_flag,
    add_eps_features_argument,
    add_tune_flags,
    parse_non_expert,
    positive_int,
    tune_settings,
    type_name,
    unit_float,
)
from mc_gguf.prune.settings import THRESHOLD_RULES
from mc_gguf.settings import CompressSettings, OdpSettings

EXAMPLE = ("example: mc-gguf compress ./Mixtral-8x7B-v0.1 --bits 2.5 --calib calib.txt -o mixtral-mc2.5.gguf\n"
           "         mc-gguf compress ./model --bits 3 --layout stock --odp-skip 0.25 -o model-stock.gguf\n"
           "         mc-gguf compress ./model --bits 3 --no-tune -o model-fast.gguf   (ggml's quantizer alone)")


def add_parser(commands) -> None:
    defaults = CompressSettings()  # the flags' defaults: the Python API's (mc_gguf.compress)
    calibration, allocation, odp = defaults.calibration, defaults.allocation, defaults.odp
    p = add_command(commands, "compress", "The whole Mixture Compressor pipeline: calibrate, allocate bits per "
                    "expert, quantize with ggml, write the GGUF, and optionally set Online Dynamic Pruning "
                    "thresholds.", EXAMPLE)
    p.add_argument("model_dir", help=MODEL_HELP)
    add_budget_flags(p, "average bits per expert weight, scales included")
    p.add_argument("-o", "--output", required=True, help="the GGUF file to write")
    p.add_argument("--calib", help="calibration text (default: the Python documentation shipped with CPython)")
    p.add_argument("--layout", choices=LAYOUTS, default=allocation.layout,
                   help="per-expert (needs the mc-gguf runtime) or stock (any llama.cpp) "
                   f"(default: {allocation.layout})")
    p.add_argument("--odp-skip", type=unit_float, default=odp.skip,
                   help="share of expert slots Online Dynamic Pruning should skip, e.g. 0.4 (default: 0, off); a "
                   "per-expert file also gets each expert's mean output, which a skipped slot adds instead of "
                   "nothing")
    p.add_argument("--odp-rule", choices=THRESHOLD_RULES, default=odp.rule,
                   help="how the thresholds share the skipped slots (see `mc-gguf odp-calibrate --help`; "
                   f"default: {odp.rule})")
    p.add_argument("--odp-renormalize", action="store_true", default=odp.renormalize,
                   help="renormalise the weights a token keeps after pruning (the paper's rule; by default they stay "
                   "as the router gave them, which costs less; see `mc-gguf odp-calibrate --help`)")
    add_device_flag(p, "the calibration's forward, its error pass's products and the tuning")
    add_ray_flag(p, "measure the experts' errors in the calibration, quantize the experts (GPTQ and tuning) and "
                 "measure the tuned-error ratios, an expert per task,")
    add_tune_flags(p, default=defaults.tune is not None)
    p.add_argument("--gptq", action="store_true", default=defaults.gptq,
                   help="with --no-tune: GPTQ error compensation alone (it also keeps the calibration's MoE inputs)")
    p.add_argument("--types", nargs="+", type=type_name, metavar="TYPE", help="candidate types (default: all); only these are measured by the calibration")
    p.add_argument("--per-projection", action=argparse.BooleanOptionalAction, default=allocation.per_projection,
                   help="a type for each expert's gate+up and another for its down (as `allocate --per-projection`; "
                   "default: on when tuning, where it lowered the bench model's KLD 1.07-1.22x at 2.06-3.07 bits, "
                   "off with --no-tune, where it helped at 3 bits and hurt at 2.5)")
    p.add_argument("--max-types", type=positive_int, metavar="N", help=MAX_TYPES_HELP)
    add_tensor_type_flag(p)
    add_cost_arguments(p, {"alpha": allocation.alpha, "beta": allocation.beta, "gamma": allocation.gamma},
                       "the summed squared MoE-block output error; `allocate` keeps the authors' 1, 1.5, 1")
    p.add_argument("--tokens", type=positive_int, default=calibration.n_tokens,
                   help=f"calibration tokens (default: {calibration.n_tokens})")
    p.add_argument("--seq-len", type=positive_int, default=calibration.seq_len,
                   help=f"tokens per calibration sequence (default: {calibration.seq_len})")
    add_eps_features_argument(p, calibration.eps_features, calibration.eps_iquant_share)
    p.add_argument("--keep-artifacts", metavar="DIR", help="keep the statistics and the plan in DIR")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def settings_of(args: argparse.Namespace) -> CompressSettings:
    """The CompressSettings the flags give (each flag's default is the settings' own)."""
    defaults = CompressSettings()
    return replace(
        defaults,
        bits=args.bits if args.bits is not None else defaults.bits,
        size=args.size,
        calibration=replace(defaults.calibration, n_tokens=args.tokens, seq_len=args.seq_len,
                            eps_features=args.eps_features, eps_iquant_share=args.eps_iquant_share,
                            device=args.device),
        allocation=replace(defaults.allocation, layout=args.layout, per_projection=args.per_projection,
                           types=tuple(args.types) if args.types else None, alpha=args.alpha, beta=args.beta,
                           gamma=args.gamma, max_types=args.max_types,
                           non_expert=parse_non_expert(args.tensor_type)),
        tune=tune_settings(args),  # a device this machine lacks is refused here, before any work
        gptq=args.gptq,
        odp=OdpSettings(skip=args.odp_skip, rule=args.odp_rule, renormalize=args.odp_renormalize),
        ray=args.ray,
    )


def run(args: argparse.Namespace) -> None:
    from mc_gguf.calibrate.text import read_text
    from mc_gguf.atomic import work_folder
    from mc_gguf.pipeline import compress, summary

    settings = settings_of(args)
    text = read_text(args.calib)
    started = time.perf_counter()
    try:
        result = compress(args.model_dir, args.output, text=text, settings=settings,
                          keep_artifacts=args.keep_artifacts, progress=not args.quiet)
    except KeyboardInterrupt:
        work = Path(args.keep_artifacts) if args.keep_artifacts else work_folder(Path(args.output))
        if work.is_dir():
            print(f"mc-gguf: the work so far is kept in {work}: the same command resumes it", file=sys.stderr)
        raise
    print(summary(result))
    print(f"done in {time.perf_counter() - started:.0f} s")
