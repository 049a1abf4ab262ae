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

    from mc_gguf.calib_text import read_text
    from mc_gguf.odp_calibrate import calibrate_odp

    text = read_text(args.text).text
    out = args.output or args.gguf
    mu, ratios = calibrate_odp(args.model_dir, text, args.gguf, out, args.skip, n_tokens=args.tokens,
                               seq_len=args.seq_len, protect_ratio=args.protect_ratio)
    for il, (m, r) in enumerate(zip(mu, ratios)):
        print(f"layer {il:3d}: mu = {m:.4f}  (median w1/w0 {np.median(r):.3f}, skips {np.mean(r < m):.1%} of tokens)")
    print(f"wrote mc.odp.mu to {out}")


def _cmd_calibrate(args: argparse.Namespace) -> None:
    from mc_gguf.calib_text import read_text
    from mc_gguf.calibrate import CalibrationSettings, calibrate
    from mc_gguf.quant_types import quant_type

    settings = CalibrationSettings(n_tokens=args.tokens, seq_len=args.seq_len, seed=args.seed,
                                   eps_tokens=args.eps_tokens, hessian=args.hessian,
                                   types=tuple(quant_type(t).name for t in args.types))
    started = time.perf_counter()
    stats = calibrate(args.model_dir, args.output, read_text(args.text), settings, progress=not args.quiet)
    print(f"wrote {args.output}: {stats.info['n_tokens']} tokens ({stats.info['n_sequences']} x "
          f"{stats.info['seq_len']}) of {stats.info['text']}, {len(stats.types)} candidate types, "
          f"in {time.perf_counter() - started:.0f} s")


def _parse_non_expert(items: list[str]) -> dict[str, str]:
    from mc_gguf.plan import NON_EXPERT_CLASSES

    parsed = {}
    for item in items:
        cls, sep, name = item.partition("=")
        if not sep or cls not in NON_EXPERT_CLASSES:
            raise McGgufError(f"--tensor-type {item!r}: expected CLASS=TYPE with CLASS one of "
                              f"{', '.join(NON_EXPERT_CLASSES)}")
        parsed[cls] = name.upper()
    return parsed


MAX_TYPES_HELP = ("at most N types (expert groups of the per-expert layout) in every layer and projection: "
                  "GPU backends run each group as ops of its own on every decoded token (the CPU runs them "
                  "in one), so fewer groups decode faster there, at some cost in quality (default: no bound)")


def _add_cost_arguments(p: argparse.ArgumentParser, defaults: dict[str, float], gamma_note: str) -> None:
    """--alpha/--beta/--gamma, the exponents of the significance cost phi^alpha * w^beta * eps^gamma."""
    p.add_argument("--alpha", type=float, default=defaults["alpha"],
                   help=f"exponent of the activation frequency (default: {defaults['alpha']:g})")
    p.add_argument("--beta", type=float, default=defaults["beta"],
                   help=f"exponent of the routing weight (default: {defaults['beta']:g})")
    p.add_argument("--gamma", type=float, default=defaults["gamma"],
                   help=f"exponent of the quantization error (default: {defaults['gamma']:g}, {gamma_note})")


def _cmd_allocate(args: argparse.Namespace) -> None:
    from mc_gguf.plan import make_plan, validate_plan
    from mc_gguf.plan_show import describe_plan
    from mc_gguf.stats import load_stats

    stats = load_stats(args.stats)
    started = time.perf_counter()
    plan = make_plan(stats, args.bits, model_dir=args.model, layout=args.layout, scope=args.scope,
                     per_layer=args.per_layer, per_projection=args.per_projection, types=args.types,
                     alpha=args.alpha, beta=args.beta, gamma=args.gamma,
                     non_expert=_parse_non_expert(args.tensor_type), stats_path=str(Path(args.stats).resolve()),
                     max_types=args.max_types)
    validate_plan(plan)
    plan.save(args.output)
    print(describe_plan(plan))
    print(f"wrote {args.output} (solved in {time.perf_counter() - started:.1f} s)")


def _cmd_plan_show(args: argparse.Namespace) -> None:
    from mc_gguf.plan import load_plan
    from mc_gguf.plan_show import describe_plan, plot_plan

    plan = load_plan(args.plan)
    print(describe_plan(plan))
    if args.plot:
        plot_plan(plan, args.plot, title=Path(args.plan).name)
        print(f"wrote {args.plot}")


def _cmd_quantize(args: argparse.Namespace) -> None:
    from mc_gguf.plan import load_plan
    from mc_gguf.quantize import quantize_model
    from mc_gguf.stats import load_stats

    stats = load_stats(args.stats) if args.stats else None
    started = time.perf_counter()
    out = quantize_model(args.model_dir, load_plan(args.plan), args.output, stats=stats, gptq=args.gptq,
                         progress=not args.quiet)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - started:.0f} s")


def _cmd_compress(args: argparse.Namespace) -> None:
    from mc_gguf.calib_text import read_text
    from mc_gguf.calibrate import CalibrationSettings
    from mc_gguf.compress import compress, summary

    settings = CalibrationSettings(n_tokens=args.tokens, seq_len=args.seq_len, hessian=args.gptq)
    started = time.perf_counter()
    result = compress(args.model_dir, args.output, args.bits, read_text(args.calib), settings=settings,
                      layout=args.layout, odp_skip=args.odp_skip or None, gptq=args.gptq,
                      keep_artifacts=args.keep_artifacts, progress=not args.quiet,
                      allocate_options={"types": args.types, "alpha": args.alpha, "beta": args.beta,
                                        "gamma": args.gamma, "max_types": args.max_types})
    print(summary(result))
    print(f"done in {time.perf_counter() - started:.0f} s")


def _cmd_inspect(args: argparse.Namespace) -> None:
    import json

    from mc_gguf.inspect_gguf import describe, inspect_gguf, plan_of

    info = inspect_gguf(args.gguf)
    print(json.dumps(info, indent=1) if args.json else describe(info))
    if args.plot:
        if not info["experts"]:
            raise McGgufError(f"{args.gguf} has no experts to plot")
        from mc_gguf.plan_show import plot_plan

        plot_plan(plan_of(info), args.plot, title=Path(args.gguf).name)
        print(f"wrote {args.plot}", file=sys.stderr)


def _cmd_eval(args: argparse.Namespace) -> None:
    import json

    from mc_gguf.calib_text import read_text
    from mc_gguf.evaluate import EvalSettings, describe_eval, evaluate_gguf

    text = read_text(args.text).text
    settings = EvalSettings(n_ctx=args.ctx, max_windows=args.chunks, odp=args.odp, mu=args.mu)
    report = evaluate_gguf(args.model, text, ref=args.ref, settings=settings, progress=not args.json)
    print(json.dumps(report, indent=1) if args.json else describe_eval(report, per_layer=args.per_layer))


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
    "calibrate": "example: mc-gguf calibrate ./Mixtral-8x7B-v0.1 --text calib.txt -o mixtral.stats\n"
                 "         mc-gguf calibrate ./Mixtral-8x7B-v0.1 -o mixtral.stats   (default text: Python's docs)",
    "allocate": "example: mc-gguf allocate mixtral.stats --bits 2.5 -o plan.json\n"
                "         mc-gguf allocate mixtral.stats --bits 3 --layout stock -o plan-stock.json\n"
                "         mc-gguf allocate mixtral.stats --bits 2.5 --per-layer --types IQ2_XXS Q2_K IQ3_XXS -o paper.json",
    "quantize": "example: mc-gguf quantize ./Mixtral-8x7B-v0.1 --plan plan.json --stats mixtral.stats -o mixtral-mc.gguf",
    "compress": "example: mc-gguf compress ./Mixtral-8x7B-v0.1 --bits 2.5 --calib calib.txt -o mixtral-mc2.5.gguf\n"
                "         mc-gguf compress ./model --bits 3 --layout stock --odp-skip 0.25 -o model-stock.gguf",
    "inspect": "example: mc-gguf inspect mixtral-mc2.5.gguf\n"
               "         mc-gguf inspect any-model.gguf --json > info.json",
    "plan-show": "example: mc-gguf plan-show plan.json --plot allocation.png",
    "eval": "example: mc-gguf eval mixtral-mc2.5.gguf --text wiki.test.raw --ref mixtral-f16.gguf\n"
            "         mc-gguf eval mixtral-mc2.5.gguf --text wiki.test.raw --no-odp --json > scores.json",
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

    from mc_gguf.allocate import AUTHORS_COST
    from mc_gguf.calibrate import CalibrationSettings
    from mc_gguf.plan import LAYOUTS, NON_EXPERT_DEFAULTS, SCOPES
    from mc_gguf.quant_types import CANDIDATES

    defaults = CalibrationSettings()
    p = sub(commands, "calibrate", "Run a Hugging Face MoE checkpoint on calibration text, one decoder layer in "
            "memory at a time, and measure per-expert statistics: activation frequency, routing weight, w1/w0 "
            "ratios, importance matrices, and the output error of every expert at every candidate GGUF type. "
            "Resumable: an interrupted run continues from its last finished layer.")
    p.add_argument("model_dir", help="Hugging Face model folder")
    p.add_argument("-o", "--output", required=True, help="statistics file to write (safetensors + JSON header)")
    p.add_argument("--text", help="calibration text, UTF-8 (default: the Python documentation shipped with "
                   "CPython, generic English prose with code; text from your domain calibrates better)")
    p.add_argument("--tokens", type=int, default=defaults.n_tokens,
                   help=f"calibration tokens (default: {defaults.n_tokens}; the paper used 262144)")
    p.add_argument("--seq-len", type=int, default=defaults.seq_len,
                   help=f"tokens per sequence, at most the model's context (default: {defaults.seq_len})")
    p.add_argument("--seed", type=int, default=defaults.seed, help="which windows of the text are used (default: 0)")
    p.add_argument("--eps-tokens", type=int, default=defaults.eps_tokens,
                   help=f"sampled tokens on which quantization errors are measured (default: {defaults.eps_tokens})")
    p.add_argument("--types", nargs="+", default=list(CANDIDATES), metavar="TYPE",
                   help=f"candidate GGUF types (default: all of {' '.join(CANDIDATES)})")
    p.add_argument("--hessian", action="store_true",
                   help="also keep each expert's full input Hessian X^T X for GPTQ: E*(H^2+F^2)*4 bytes per layer, "
                        "e.g. 7.1 GB per layer (227 GB in all) for Mixtral 8x7B, 63 MB for a 6-layer model of "
                        "hidden 256 and 8 experts of 512")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_calibrate)

    p = sub(commands, "allocate", "Choose a GGUF type for every expert under a bits-per-weight budget: an integer "
            "program (HiGHS) minimising the summed cost phi^alpha * w^beta * eps^gamma of the choices.")
    p.add_argument("stats", help="statistics from `mc-gguf calibrate`")
    p.add_argument("--bits", type=float, required=True, help="average bits per weight over the scope, "
                   "counted in real bytes (scales included)")
    p.add_argument("-o", "--output", required=True, help="plan file to write (JSON)")
    p.add_argument("--scope", choices=SCOPES, default="experts",
                   help="what the budget averages over: the expert tensors, or every tensor of the file (default: experts)")
    p.add_argument("--layout", choices=LAYOUTS, default="per-expert",
                   help="per-expert: a type per expert (needs the mc-gguf runtime); stock: one type per layer and "
                        "projection, loads in unmodified llama.cpp (default: per-expert)")
    p.add_argument("--types", nargs="+", metavar="TYPE", help="candidate types (default: all in the statistics)")
    p.add_argument("--per-layer", action="store_true", help="the paper's form: the budget holds in every layer, "
                   "with at least one expert below and one at or above it")
    p.add_argument("--per-projection", action="store_true",
                   help="a type for gate+up and another for down (errors treated as additive)")
    p.add_argument("--max-types", type=int, metavar="N", help=MAX_TYPES_HELP)
    _add_cost_arguments(p, AUTHORS_COST, "as the authors' code; the paper writes 2")
    p.add_argument("--tensor-type", action="append", default=[], metavar="CLASS=TYPE",
                   help="type of a non-expert class: token_embd, output or attn (defaults: "
                        + ", ".join(f"{k}={v}" for k, v in NON_EXPERT_DEFAULTS.items()) + "); norms and router stay F32")
    p.add_argument("--model", help="the model folder, if it moved since calibration")
    p.set_defaults(func=_cmd_allocate)

    p = sub(commands, "quantize", "Quantize a Hugging Face checkpoint to a plan with ggml's quantizers and write "
            "the GGUF (one expert in memory at a time; written atomically).")
    p.add_argument("model_dir", help="Hugging Face model folder")
    p.add_argument("--plan", required=True, help="plan from `mc-gguf allocate`")
    p.add_argument("--stats", help="calibration statistics: importance matrices (needed by IQ1/IQ2 types) and "
                   "Hessians for GPTQ")
    p.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ error compensation with ggml's quantizer (default: on when the statistics hold Hessians)")
    p.add_argument("-o", "--output", required=True, help="the GGUF file to write")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_quantize)

    p = sub(commands, "compress", "The whole Mixture Compressor pipeline: calibrate, allocate bits per expert, "
            "quantize with ggml, write the GGUF, and optionally set Online Dynamic Pruning thresholds.")
    p.add_argument("model_dir", help="Hugging Face model folder")
    p.add_argument("--bits", type=float, required=True, help="average bits per expert weight, scales included")
    p.add_argument("-o", "--output", required=True, help="the GGUF file to write")
    p.add_argument("--calib", help="calibration text (default: the Python documentation shipped with CPython)")
    p.add_argument("--layout", choices=LAYOUTS, default="per-expert",
                   help="per-expert (needs the mc-gguf runtime) or stock (any llama.cpp) (default: per-expert)")
    p.add_argument("--odp-skip", type=float, default=0.0,
                   help="share of expert slots Online Dynamic Pruning should skip, e.g. 0.25 (default: 0, off)")
    p.add_argument("--gptq", action="store_true", help="GPTQ error compensation (keeps full Hessians during "
                   "calibration; see `mc-gguf calibrate --help` for their size)")
    p.add_argument("--types", nargs="+", metavar="TYPE", help="candidate types (default: all)")
    p.add_argument("--max-types", type=int, metavar="N", help=MAX_TYPES_HELP)
    from mc_gguf.compress import DEFAULT_COST

    _add_cost_arguments(p, DEFAULT_COST, "the summed squared MoE-block output error; `allocate` keeps the "
                        "authors' 1, 1.5, 1")
    p.add_argument("--tokens", type=int, default=defaults.n_tokens,
                   help=f"calibration tokens (default: {defaults.n_tokens})")
    p.add_argument("--seq-len", type=int, default=defaults.seq_len,
                   help=f"tokens per calibration sequence (default: {defaults.seq_len})")
    p.add_argument("--keep-artifacts", metavar="DIR", help="keep the statistics and the plan in DIR")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_compress)

    p = sub(commands, "inspect", "Show the tensor types of any GGUF, expert by expert, and its mc.* metadata.")
    p.add_argument("gguf", help="a GGUF file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", help="write a heat map of the experts' bits per weight to this PNG")
    p.set_defaults(func=_cmd_inspect)

    p = sub(commands, "plan-show", "Show a plan: types per layer, bits per weight, predicted size; "
            "optionally a heat map of the bits of every expert.")
    p.add_argument("plan", help="plan file from `mc-gguf allocate`")
    p.add_argument("--plot", help="write a heat map (layers x experts) to this PNG")
    p.set_defaults(func=_cmd_plan_show)

    p = sub(commands, "eval", "Perplexity of a GGUF on a text the way llama-perplexity measures it "
            "(non-overlapping windows, the second half of each scored), with --ref the KL divergence from a "
            "reference GGUF and top-1 agreement (as llama-perplexity --kl-divergence), and the expert slots "
            "computed and skipped.")
    p.add_argument("model", help="GGUF file to evaluate")
    p.add_argument("--text", required=True, help="evaluation text file (UTF-8)")
    p.add_argument("--ref", help="reference GGUF with the same vocabulary, e.g. the F16 file")
    p.add_argument("--ctx", type=int, default=512, help="window length in tokens (default: 512)")
    p.add_argument("--chunks", type=int, help="evaluate at most this many windows (default: all the text gives)")
    p.add_argument("--odp", action=argparse.BooleanOptionalAction, default=True,
                   help="Online Dynamic Pruning as the file says, or off (default: --odp)")
    p.add_argument("--mu", type=float, help="one pruning threshold for every layer, in [0, 1]")
    p.add_argument("--per-layer", action="store_true", help="also show expert slots per layer")
    p.add_argument("--json", action="store_true", help="print one JSON object with every figure and the settings")
    p.set_defaults(func=_cmd_eval)

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
