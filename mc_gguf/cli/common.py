"""Pieces several commands share: how a command is added, and flags with one meaning everywhere."""

from __future__ import annotations

import argparse
import math
import sys


def add_command(parent, name: str, help_text: str, example: str) -> argparse.ArgumentParser:
    """A subcommand whose --help shows its description and, at the end, an example."""
    return parent.add_parser(name, help=help_text, description=help_text, epilog=example,
                             formatter_class=argparse.RawDescriptionHelpFormatter)


MAX_TYPES_HELP = ("at most N types (expert groups of the per-expert layout) in every layer and projection: "
                  "GPU backends run each group as ops of its own on every decoded token (the CPU runs them "
                  "in one), so fewer groups decode faster there, at some cost in quality (default: no bound)")


def add_cost_arguments(p: argparse.ArgumentParser, defaults: dict[str, float], gamma_note: str) -> None:
    """--alpha/--beta/--gamma, the exponents of the significance cost phi^alpha * w^beta * eps^gamma."""
    p.add_argument("--alpha", type=non_negative_float, default=defaults["alpha"],
                   help=f"exponent of the activation frequency (default: {defaults['alpha']:g})")
    p.add_argument("--beta", type=non_negative_float, default=defaults["beta"],
                   help=f"exponent of the routing weight (default: {defaults['beta']:g})")
    p.add_argument("--gamma", type=non_negative_float, default=defaults["gamma"],
                   help=f"exponent of the quantization error (default: {defaults['gamma']:g}, {gamma_note})")


def add_eps_features_argument(p: argparse.ArgumentParser, default: int, iquant_share: int = 4) -> None:
    p.add_argument("--eps-features", type=non_negative_int, default=default, metavar="N",
                   help="measure each expert's quantization errors on a seeded sample of N of its intermediate "
                        "features, in blocks of 256, scaled to the whole expert: the error pass costs N / "
                        f"intermediate size of a full one (Mixtral 8x7B: 14336); 0 measures all (default: {default})")
    p.add_argument("--eps-iquant-share", type=positive_int, default=iquant_share, metavar="K",
                   help="measure the i-quants (5-20x slower to quantize than the K-quants) on 1/K of those blocks, "
                        "scaled by how the K-quant of about their bits compares there and on all of them; 1 measures "
                        f"them on all (default: {iquant_share})")


def add_generation_flags(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    """The model, length, sampling and pruning flags that run and chat share."""
    p.add_argument("model", help="GGUF file")
    p.add_argument("-n", "--max-tokens", type=positive_int, default=max_tokens, help=f"tokens to generate (default: {max_tokens})")
    p.add_argument("--temperature", type=non_negative_float, default=temperature,
                   help=f"sampling temperature; 0 is greedy (default: {temperature})")
    p.add_argument("--no-odp", action="store_true", help="turn Online Dynamic Pruning off")
    p.add_argument("--mu", type=unit_float, help="one pruning threshold for every layer, in [0, 1] "
                   "(default: the file's mc.odp.mu)")
    add_rpc_flag(p)
    add_repack_flag(p)


def add_repack_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-repack", dest="repack", action="store_false",
                   help="as llama.cpp's --no-repack: compute from the mapped file instead of copying the weights the "
                   "CPU has faster kernels for (Q4_K, Q8_0, ...) into memory; for a model larger than RAM, at some "
                   "prompt speed")


def add_rpc_flag(p: argparse.ArgumentParser) -> None:
    from mc_gguf.runtime.supervise import DEFAULT_TIMEOUT_S

    p.add_argument("--rpc", action="append", default=[], metavar="HOST:PORT",
                   help="run the layers on this `mc-gguf runtime rpc-server` (repeatable, as llama.cpp's --rpc; "
                   "a stock llama.cpp rpc-server is refused); a server that closes the connection, breaks it or "
                   "sends what the runtime cannot read ends the command with one error line")
    p.add_argument("--rpc-timeout", type=positive_float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="end the command when an RPC server owes a reply and sends nothing for this long (default: "
                   f"{DEFAULT_TIMEOUT_S:g}, room for one batch's forward pass of a large model on a slow CPU, which "
                   "a server answers in one reply)")


# TuneSettings' defaults, repeated here so that --help imports no torch (a test keeps them equal)
TUNE_ITERS = 8


def add_tune_flags(p: argparse.ArgumentParser, default: bool = False) -> None:
    what = ("GPTQ, then tune every K-quant expert's rounding, sub-block scales and fp16 scales by coordinate "
            "descent on its Hessian (an i-quant's scales), the down projection fitted to the quantized gate and "
            "up; 2.5-4x lower KL divergence than ggml's quantizer alone at 2-3 bits on the bench model")
    if default:
        p.add_argument("--tune", action=argparse.BooleanOptionalAction, default=True,
                       help=f"{what} (default: on; it keeps the calibration's MoE inputs on disk beside the "
                       "output while it works, 1 GB per layer at Mixtral 8x7B's shapes; --no-tune quantizes with "
                       "ggml's quantizer and the importance matrix alone, faster, and keeps no inputs)")
    else:
        p.add_argument("--tune", action="store_true",
                       help=f"{what} (needs the Hessians' inputs: calibrate --hessian)")
    p.add_argument("--tune-iters", type=positive_int, default=TUNE_ITERS, metavar="N",
                   help=f"most coordinate-descent sweeps per tensor (default: {TUNE_ITERS}; it stops earlier when "
                   "a sweep gains under 0.5%%)")
    add_device_flag(p, "the tuning")


def add_device_flag(p: argparse.ArgumentParser, what: str) -> None:
    if any("--device" in action.option_strings for action in p._actions):
        return
    p.add_argument("--device", type=device_arg, default="cpu", metavar="DEVICE",
                   help=f"torch device {what} runs on: cpu, cuda, cuda:N, mps (ggml's quantizer always runs on "
                   "the CPU); one that this machine or its torch lacks is refused before any work (default: cpu)")


def device_arg(text: str) -> str:
    from mc_gguf.device import device_name

    try:
        return device_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def tune_settings(args: argparse.Namespace):
    """The TuneSettings of --tune, --tune-iters and --device, or None without --tune; a device this machine
    lacks is refused here, before any work."""
    from mc_gguf.device import torch_device

    torch_device(args.device)
    if not args.tune:
        return None
    from mc_gguf.quantize.tune import TuneSettings

    return TuneSettings(iters=args.tune_iters, device=args.device)


def print_expert_stats(counts) -> None:
    total = sum(counts.computed) + sum(counts.skipped)
    if total:
        print(f"[expert slots: {sum(counts.computed)} computed, {sum(counts.skipped)} skipped "
              f"({100 * counts.skipped_share:.1f}%)]", file=sys.stderr)


# Argument types: a bad value is refused by the parser, with the flag's name, before any work starts.

def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is below 0")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not above 0")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is below 0")
    return value


def unit_float(text: str) -> float:
    """A share or threshold in [0, 1]."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return value


def type_name(text: str) -> str:
    """A candidate GGUF type, by name (any case)."""
    from mc_gguf.ggml.types import quant_type

    try:
        return quant_type(text).name
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
