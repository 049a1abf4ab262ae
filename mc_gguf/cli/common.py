"""Pieces several commands share: how a command is added, and flags with one meaning everywhere."""

from __future__ import annotations

import argparse
import math
import sys

from mc_gguf.allocate.plan import NON_EXPERT_CLASSES, NON_EXPERT_DEFAULTS, NON_EXPERT_TYPES
from mc_gguf.errors import InvalidValueError
from mc_gguf.quantize.settings import TuneSettings


class CommandParser(argparse.ArgumentParser):
    """A command's parser: a flag it does not know is its own usage error (its usage, exit 2). argparse hands a
    subcommand's unknown flags up to the top parser, which would report them with the usage of `mc-gguf` alone."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


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


def add_generation_flags(p: argparse.ArgumentParser, max_tokens: int, ctx_help: str, sampling: dict) -> None:
    """The flags that run and chat share: llama.cpp's for the model (add_llama_flags), the length, the sampling
    (``sampling``: each sampler's default, as the command applies it) and the seed, and mc-gguf's pruning."""
    add_llama_flags(p, ctx_help)
    p.add_argument("-n", "--n-predict", "--predict", "--max-tokens", dest="max_tokens", type=positive_int,
                   default=max_tokens, metavar="N", help=f"tokens to generate (default: {max_tokens})")
    p.add_argument("--temp", "--temperature", dest="temperature", type=non_negative_float,
                   default=sampling["temperature"], metavar="T",
                   help=f"sampling temperature; 0 is greedy (default: {sampling['temperature']:g})")
    p.add_argument("--top-k", type=non_negative_int, default=sampling["top_k"], metavar="N",
                   help=f"sample among the N likeliest tokens; 0 is all (default: {sampling['top_k']})")
    p.add_argument("--top-p", type=unit_float, default=sampling["top_p"], metavar="P",
                   help=f"nucleus sampling: among the likeliest tokens that make up P of the probability; 1 is "
                   f"all (default: {sampling['top_p']:g})")
    p.add_argument("--min-p", type=unit_float, default=sampling["min_p"], metavar="P",
                   help="leave out the tokens less likely than P times the likeliest; 0 keeps all (default: "
                   f"{sampling['min_p']:g})")
    p.add_argument("--repeat-penalty", type=positive_float, default=sampling["repeat_penalty"], metavar="X",
                   help="divide the odds of the last 64 tokens by X; 1 is none (default: "
                   f"{sampling['repeat_penalty']:g})")
    p.add_argument("-s", "--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--no-odp", action="store_true", help="turn Online Dynamic Pruning off")
    p.add_argument("--mu", type=unit_float, help="one pruning threshold for every layer, in [0, 1] "
                   "(default: the file's mc.odp.mu)")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The sampling keywords of llama-cpp-python's create_completion (and its chat handlers) that
    add_generation_flags' flags set."""
    return {name: getattr(args, name) for name in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty")}


def add_model_argument(p: argparse.ArgumentParser, help_text: str = "GGUF file") -> None:
    """``args.model``: the file given as the first argument, or with llama.cpp's -m/--model (one of the two)."""
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("model", nargs="?", default=argparse.SUPPRESS, help=f"{help_text} (or -m FILE)")
    model.add_argument("-m", "--model", dest="model", metavar="FILE", help="the same, as llama.cpp's -m")


def add_llama_flags(p: argparse.ArgumentParser, ctx_help: str, ctx_default: int | None = None,
                    model_help: str = "GGUF file") -> None:
    """llama.cpp's flags for loading a model, spelled as llama.cpp spells them (common/arg.cpp): the model (FILE
    or -m FILE), -c/--ctx-size (mc-gguf's --ctx too), -t, -tb, -ngl, --cpu-moe, --n-cpu-moe, -ot, --rpc and
    --no-repack. ``llama_load_kwargs`` turns them into load()'s keywords."""
    add_model_argument(p, model_help)
    p.add_argument("-c", "--ctx-size", "--ctx", dest="ctx", type=positive_int, default=ctx_default, metavar="N",
                   help=ctx_help)
    p = p.add_argument_group("where the model runs (llama.cpp's flags)")
    p.add_argument("-t", "--threads", type=positive_int, metavar="N",
                   help="CPU threads generating tokens (default: llama-cpp-python's, half the CPU's cores)")
    p.add_argument("-tb", "--threads-batch", type=positive_int, metavar="N",
                   help="CPU threads reading the prompt, in batches (default: llama-cpp-python's, every core)")
    p.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", dest="n_gpu_layers", type=gpu_layers, metavar="N",
                   help="layers to put on the GPU (or the --rpc servers), the output layer counted last: a number, "
                   "or all (-1) (default: all with --rpc or on a runtime built with a GPU backend, CUDA, Metal or "
                   "Vulkan; 0 otherwise)")
    p.add_argument("-cmoe", "--cpu-moe", action="store_true",
                   help="keep every MoE expert tensor in CPU memory, the per-expert layout's groups among them "
                   "(llama.cpp's pattern \\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU); with -ngl, the GPU holds "
                   "the rest")
    p.add_argument("-ncmoe", "--n-cpu-moe", type=non_negative_int, default=0, metavar="N",
                   help="keep the MoE expert tensors of the first N layers in CPU memory (default: 0)")
    p.add_argument("-ot", "--override-tensor", action="append", default=[], type=override_tensor,
                   metavar="PATTERN=BUFFER",
                   help="put the tensors whose names match the regular expression PATTERN in buffer type BUFFER "
                   "(CPU, CUDA0, Metal, Vulkan0, RPC0[HOST:PORT]; an unknown one is refused with the list), e.g. "
                   "-ot 'blk\\.1\\.=CPU'; repeatable, or several separated by commas; the first that matches "
                   "wins, and these come before --cpu-moe's and --n-cpu-moe's")
    add_rpc_flag(p)
    add_repack_flag(p)


def llama_load_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``mc_gguf.loader.model.load`` that add_llama_flags' flags set (the model path
    is ``args.model``; ODP's flags are the command's own)."""
    return dict(n_ctx=args.ctx, n_threads=args.threads, n_threads_batch=args.threads_batch,
                n_gpu_layers=args.n_gpu_layers, cpu_moe=args.cpu_moe, n_cpu_moe=args.n_cpu_moe,
                override_tensor=tuple(args.override_tensor), rpc=tuple(args.rpc), repack=args.repack)


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
    add_tune_iters_flag(p)
    p.add_argument("--tune-lattice", action="store_true",
                   help="also move the grid points of the IQ1_S, IQ2_XXS and IQ2_XS tensors, not only their scales: "
                   "on the bench model 12-19%% lower KL divergence at 2.06-2.25 expert bits, but 1.9-5.1x those types' "
                   "tuning time (at Mixtral 8x7B's shapes, minutes more per expert on a CPU)")
    add_device_flag(p, "the tuning")


def add_tune_iters_flag(p: argparse.ArgumentParser) -> None:
    iters = TuneSettings().iters
    p.add_argument("--tune-iters", type=positive_int, default=iters, metavar="N",
                   help=f"most coordinate-descent sweeps per tensor (default: {iters}; it stops earlier when "
                   "a sweep gains under 0.5%%)")


def add_ray_flag(p: argparse.ArgumentParser, what: str, output: str = "the file") -> None:
    p.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help=f"{what} on the machines of a Ray cluster (pip install 'mc-gguf[ray]'): ADDRESS is the head's "
                   "HOST:PORT, or none for the cluster this machine belongs to (RAY_ADDRESS, or the one `ray start` "
                   "joined). Every machine must see the model and the work folder at the same paths (one "
                   f"machine, or a shared file system); the tasks run on the machines' CPUs; {output} is the same "
                   "byte for byte as without --ray")


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
    """The TuneSettings of --tune, --tune-iters, --tune-lattice and --device, or None without --tune; a device
    this machine lacks is refused here, before any work."""
    from mc_gguf.device import torch_device

    torch_device(args.device)
    if not args.tune:
        if args.tune_lattice:
            raise InvalidValueError("--tune-lattice moves what the tuning tunes, and the tuning is off here "
                                    "(compress --no-tune, or quantize without --tune)")
        return None
    return TuneSettings(iters=args.tune_iters, device=args.device, lattice=args.tune_lattice)


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


def gpu_layers(text: str) -> int:
    """-ngl's value: a number of layers, or all (as llama.cpp, 'all', 'auto' or a negative number)."""
    if text.strip().lower() in ("all", "auto"):
        return -1
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of layers (or all)") from None
    return max(value, -1)


def override_tensor(text: str) -> str:
    """-ot's value, PATTERN=BUFFER[,...], checked here; the buffer's name when the model loads."""
    from mc_gguf.runtime.placement import parse_override_tensor

    try:
        parse_override_tensor(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


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


SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30,
              "TI": 2**40}


def file_size(text: str) -> int:
    """Bytes: 9.5G, 8.44M, 700K (powers of 1000, as file sizes are shown on the Hugging Face Hub), 9GiB, 512Mi
    (powers of 1024), 123456789; a trailing B is optional."""
    number = text.strip().upper().removesuffix("B")
    unit = next((u for u in sorted(SIZE_UNITS, key=len, reverse=True) if u and number.endswith(u)), "")
    try:
        value = float(number[:len(number) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file size (e.g. 9.5G, 8.44M, 9GiB, 123456789)") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a size above 0")
    return int(value * SIZE_UNITS[unit])


def add_budget_flags(p: argparse.ArgumentParser, bits_help: str) -> None:
    """--bits B or --size SIZE, one of the two."""
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--bits", type=positive_float, help=bits_help)
    budget.add_argument("--size", type=file_size, metavar="SIZE",
                        help="the largest file to write instead, e.g. 9.5G, 8.44M or 9GiB (a target size, as "
                        "llama.cpp's PR #15550 proposes for llama-quantize): the header is paid first, the experts' "
                        "types and the other tensors' share the rest (attention, token_embd and output, each at the "
                        "type its measured error earns, unless --tensor-type fixes its class)")


def add_tensor_type_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-type", action="append", default=[], metavar="CLASS=TYPE",
                   help="type of a non-expert class: token_embd, output or attn (defaults: "
                        + ", ".join(f"{k}={v}" for k, v in NON_EXPERT_DEFAULTS.items()) + "; with a budget over the "
                        "whole file, --size or --scope model, a class not given here is chosen tensor by tensor with "
                        "the experts' types); norms and router stay F32; repeat for each class")


def parse_non_expert(items: list[str]) -> dict[str, str]:
    """--tensor-type CLASS=TYPE flags as {class: type}, or a clear error."""
    parsed = {}
    for item in items:
        cls, sep, name = item.partition("=")
        if not sep or cls not in NON_EXPERT_CLASSES:
            raise InvalidValueError(f"--tensor-type {item!r}: expected CLASS=TYPE with CLASS one of "
                                    f"{', '.join(NON_EXPERT_CLASSES)}")
        if name.upper() not in NON_EXPERT_TYPES:
            raise InvalidValueError(f"--tensor-type {item!r}: {name!r} is not a type for non-expert tensors; "
                                    f"choose one of {', '.join(NON_EXPERT_TYPES)}")
        parsed[cls] = name.upper()
    return parsed


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


# what a model argument takes (hf/hub.py model_folder)
MODEL_HELP = ("the model: a folder (config.json and safetensors), a Hugging Face cache folder models--ORG--NAME, or "
              "a Hub id ORG/NAME[@REVISION] (fetched into the cache, HF_HOME and HF_HUB_OFFLINE honoured)")
