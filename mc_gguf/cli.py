"""The ``mc-gguf`` command line: a thin layer over the library's functions."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mc_gguf import __version__
from mc_gguf.errors import McGgufError


def _cmd_convert(args: argparse.Namespace) -> None:
    from mc_gguf.convert import convert

    started = time.perf_counter()
    out = convert(args.model_dir, args.output, args.type, progress=not args.quiet)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {args.type}) in {time.perf_counter() - started:.1f} s")


def _cmd_runtime_build(args: argparse.Namespace) -> None:
    from mc_gguf.runtime.build import BuildFlags, ensure_runtime

    flags = BuildFlags(cuda=args.cuda, metal=args.metal, cuda_architectures=args.cuda_architectures)
    started = time.perf_counter()
    wheel = ensure_runtime(flags, force=args.force)
    print(f"patched runtime ready: {wheel.name} ({time.perf_counter() - started:.0f} s)")


def _cmd_runtime_status(args: argparse.Namespace) -> None:
    from mc_gguf.runtime.status import REQUIRED_PATCH_LEVEL, runtime_status

    status = runtime_status()
    print(status.describe())
    if not status.patched or status.patch_level < REQUIRED_PATCH_LEVEL:
        sys.exit(1)


def _print_expert_stats(counts) -> None:
    total = sum(counts.computed) + sum(counts.skipped)
    if total:
        print(f"[expert slots: {sum(counts.computed)} computed, {sum(counts.skipped)} skipped "
              f"({100 * counts.skipped_share:.1f}%)]", file=sys.stderr)


def _cmd_run(args: argparse.Namespace) -> None:
    from mc_gguf.run import generate

    text, counts = generate(args.model, args.prompt, args.max_tokens, temperature=args.temperature,
                            seed=args.seed, odp=not args.no_odp, mu=args.mu)
    print(args.prompt + text)
    _print_expert_stats(counts)


def _cmd_chat(args: argparse.Namespace) -> None:
    from mc_gguf.run import load

    llm = load(args.model, odp=not args.no_odp, mu=args.mu, n_ctx=args.ctx)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("mc-gguf chat: an empty line or Ctrl-D ends the chat.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = []
        for chunk in llm.create_chat_completion(messages, max_tokens=args.max_tokens,
                                                temperature=args.temperature, stream=True):
            piece = chunk["choices"][0]["delta"].get("content") or ""
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
    _print_expert_stats(llm.expert_stats())


def _cmd_odp_calibrate(args: argparse.Namespace) -> None:
    import numpy as np

    from mc_gguf.odp_calibrate import calibrate_odp

    text = Path(args.text).read_text(encoding="utf-8")
    out = args.output or args.gguf
    mu, ratios = calibrate_odp(args.model_dir, text, args.gguf, out, args.skip, n_tokens=args.tokens,
                               seq_len=args.seq_len, protect_ratio=args.protect_ratio)
    for il, (m, r) in enumerate(zip(mu, ratios)):
        print(f"layer {il:3d}: mu = {m:.4f}  (median w1/w0 {np.median(r):.3f}, skips {np.mean(r < m):.1%} of tokens)")
    print(f"wrote mc.odp.mu to {out}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from mc_gguf.demo import run_demo

    run_demo(Path(args.workdir))


EXAMPLES = {
    "convert": "example: mc-gguf convert ./Mixtral-8x7B-v0.1 -o mixtral-f16.gguf --type f16",
    "runtime build": "example: mc-gguf runtime build            (CPU)\n"
                     "         mc-gguf runtime build --cuda --cuda-architectures 86",
    "runtime status": "example: mc-gguf runtime status",
    "run": "example: mc-gguf run mixtral-f16.gguf -p 'The capital of France is' -n 16",
    "demo": "example: mc-gguf demo --workdir build/demo",
    "chat": "example: mc-gguf chat mixtral-q4.gguf            (ODP as the file says)\n"
            "         mc-gguf chat mixtral-q4.gguf --mu 0.4   (one threshold for every layer)",
    "odp-calibrate": "example: mc-gguf odp-calibrate ./Mixtral-8x7B-v0.1 mixtral-q4.gguf --text calib.txt --skip 0.15",
}


def _add_generation_flags(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    """The model, length, sampling and pruning flags that run and chat share."""
    p.add_argument("model", help="GGUF file")
    p.add_argument("-n", "--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default: {max_tokens})")
    p.add_argument("--temperature", type=float, default=temperature,
                   help=f"sampling temperature; 0 is greedy (default: {temperature})")
    p.add_argument("--no-odp", action="store_true", help="turn Online Dynamic Pruning off")
    p.add_argument("--mu", type=float, help="one pruning threshold for every layer, in [0, 1] "
                   "(default: the file's mc.odp.mu)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mc-gguf",
        description="Mixture Compressor for Mixture-of-Experts LLMs: convert, compress and run them as GGUF in llama.cpp.",
    )
    parser.add_argument("--version", action="version", version=f"mc-gguf {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def sub(parent, name: str, help_text: str, key: str | None = None) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES[key or name],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)

    p = sub(commands, "convert", "Convert a Hugging Face MoE checkpoint (Mixtral) into a GGUF llama.cpp runs.")
    p.add_argument("model_dir", help="Hugging Face model folder (config.json, safetensors shards, tokenizer.model)")
    p.add_argument("-o", "--output", required=True, help="the GGUF file to write (written atomically)")
    p.add_argument("--type", default="f16", choices=["f32", "f16", "bf16", "q8_0"],
                   help="type of the weight matrices; norms and router stay F32 (default: f16)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)

    runtime = commands.add_parser("runtime", help="Build, install and check the patched llama.cpp runtime.",
                                  description="Build, install and check the patched llama.cpp runtime.")
    runtime_commands = runtime.add_subparsers(dest="runtime_command", required=True, metavar="COMMAND")
    p = sub(runtime_commands, "build", "Build llama-cpp-python with the mc-gguf patches and install it "
            "(cached: a second run installs the cached wheel in seconds).", "runtime build")
    p.add_argument("--cuda", action="store_true", help="also build the CUDA backend")
    p.add_argument("--metal", action="store_true", help="also build the Metal backend (macOS)")
    p.add_argument("--cuda-architectures", help="CMAKE_CUDA_ARCHITECTURES, e.g. 86 or '80;89' (default: CMake's)")
    p.add_argument("--force", action="store_true", help="rebuild even when a cached wheel exists")
    p.set_defaults(func=_cmd_runtime_build)
    p = sub(runtime_commands, "status", "Say whether the installed llama_cpp is the patched runtime "
            "(exit 1 when it is not).", "runtime status")
    p.set_defaults(func=_cmd_runtime_status)

    p = sub(commands, "run", "Generate text from a GGUF once.")
    _add_generation_flags(p, max_tokens=32, temperature=0.0)
    p.add_argument("-p", "--prompt", required=True, help="the prompt")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.set_defaults(func=_cmd_run)

    p = sub(commands, "chat", "Chat with a GGUF using its chat template; prints the pruned share of "
            "expert slots at the end.")
    _add_generation_flags(p, max_tokens=256, temperature=0.7)
    p.add_argument("--system", help="a system message")
    p.add_argument("--ctx", type=int, help="context length (default: the model's, at most 4096)")
    p.set_defaults(func=_cmd_chat)

    p = sub(commands, "odp-calibrate", "Choose per-layer Online Dynamic Pruning thresholds on calibration "
            "text (quantiles of w1/w0 that skip the asked share of expert slots) and write them into a GGUF.")
    p.add_argument("model_dir", help="the Hugging Face model folder the GGUF was made from")
    p.add_argument("gguf", help="the GGUF to annotate")
    p.add_argument("--text", required=True, help="calibration text file (UTF-8)")
    p.add_argument("--skip", type=float, default=0.15, help="share of expert slots to skip (default: 0.15)")
    p.add_argument("--tokens", type=int, default=8192, help="calibration tokens (default: 8192)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (default: 512)")
    p.add_argument("--protect-ratio", type=float, default=0.02,
                   help="share of prompt tokens that keep all experts (default: 0.02)")
    p.add_argument("-o", "--output", help="write a copy here instead of updating GGUF in place")
    p.set_defaults(func=_cmd_odp_calibrate)

    p = sub(commands, "demo", "Build a tiny seeded Mixtral, convert it and generate from it: the whole "
            "pipeline offline, in about a minute.")
    p.add_argument("--workdir", default="build/demo", help="where the demo's model and GGUF go (default: build/demo)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except McGgufError as exc:
        print(f"mc-gguf: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mc-gguf: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
