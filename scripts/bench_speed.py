#!/usr/bin/env python3
"""Prefill and decode speed of uniform, per-expert and pruned files, against the memory-bandwidth limit.

Builds a synthetic Mixtral-shaped model (seeded random weights: speed does
not depend on what the weights say) large enough that decoding is bound by
memory bandwidth here: by default hidden 1024, 8 experts of 3584, 16 layers,
about 0.9 GB with the experts at Q4_K and everything else at Q8_0. Then, in
separate processes, each on all cores, in --repeats rounds that run every
case once (so the machine's drift lands on all alike), medians over rounds:
- uniform Q4_K experts, on stock llama.cpp (the unpatched build of the same
  sdist) and on the patched runtime;
- the same experts in the per-expert layout: one type per projection keeps
  the stock tensor, so this runs the stock graph (the comparison's noise
  floor);
- a per-expert file of the same size: in every layer 3 experts Q3_K,
  2 Q4_K, 3 Q5_K (4.48 bits per weight against 4.5), three expert groups
  per projection (the layout and the types' own kernel speeds);
- the uniform file's own bytes split into those three groups (paired
  comparison only): the groups' cost alone, with no type changed;
- uniform Q3_K and Q5_K files: the mixed file's types on their own (ggml's
  CPU kernels differ in speed per type; the mixed file's expected speed is
  the slot-weighted mean of its types' times per token);
- the uniform file with Online Dynamic Pruning at skip shares of 15, 25 and
  40% of the expert slots (one threshold for every layer, found by bisection
  on the runtime's own slot counters during decoding). A skipped slot is an
  expert's bytes not read, so the most skipping can give is the ratio of a
  token's bytes unpruned and pruned ("bandwidth_limit_ratio": the attention
  and output matrices are read either way).
Decoding feeds a fixed seeded token stream one token per call, so every case
routes the same tokens. Separate processes drift apart by several percent, so
the layouts and types are also compared in one process: all files but the
pruned ones, loaded side by side, decode the same stream in turns of
--paired-block tokens, and each file's speed is reported relative to the
uniform Q4_K file's in the same turns ("paired_decode"); the pruned decodes
likewise against the unpruned one ("odp_decode"). The machine's read
bandwidth is measured in the same run (a streaming sum over a large array, one
thread per core); a decoded token
must read every non-expert matrix but the embedding table, and the chosen
experts' matrices: bytes / bandwidth is the limit, achieved / limit the ratio.
Prints one JSON object; --json and --png write it and a bar chart.

    python scripts/bench_speed.py [--workdir build/bench-speed] [--json speed.json] [--png speed.png]
    python scripts/bench_speed.py --quick     (a tiny model, one run each: checks the script works)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from bench_common import add_output_flags, emit_json

from mc_gguf.evaluate.bench import token_bytes

N_THREADS = os.cpu_count() or 1
MIXED_TYPES = ("Q3_K", "Q3_K", "Q3_K", "Q4_K", "Q4_K", "Q5_K", "Q5_K", "Q5_K")
UNIFORM_TYPE = "Q4_K"
Q8_NON_EXPERT = {"token_embd": "Q8_0", "output": "Q8_0", "attn": "Q8_0"}
SKIP_SHARES = (0.15, 0.25, 0.40)
# the mixed file's other types, also measured uniform: ggml's CPU kernels differ in speed per
# type, and the mixed file's expected speed follows from its types' own speeds
OTHER_MIXED_TYPES = sorted(set(MIXED_TYPES) - {UNIFORM_TYPE})


def model_spec(quick: bool):
    from mc_gguf.hf.tiny import TinyMixtralSpec

    if quick:
        return TinyMixtralSpec(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_local_experts=8,
                               max_shard_size="1GB", dtype="bfloat16")
    return TinyMixtralSpec(hidden_size=1024, intermediate_size=3584, num_hidden_layers=16, num_attention_heads=8,
                           num_key_value_heads=2, num_local_experts=8, max_shard_size="2GB", dtype="bfloat16")


def mixed_plan(ckpt, seed: int = 0):
    """Per-expert layout: every layer's experts at MIXED_TYPES in a seeded order, one type per expert."""
    from mc_gguf.allocate.plan import Plan
    from mc_gguf.allocate.size import predict
    from mc_gguf.ggml.types import quant_type

    rng = np.random.default_rng(seed)
    experts = [[dict.fromkeys(("gate", "up", "down"), MIXED_TYPES[i % len(MIXED_TYPES)])
                for i in rng.permutation(ckpt.n_experts)] for _ in range(ckpt.n_layers)]
    bits = float(np.mean([quant_type(t).bits_per_weight for t in MIXED_TYPES]))
    plan = Plan("per-expert", experts, dict(Q8_NON_EXPERT), {"bits": bits, "scope": "experts", "mixed": MIXED_TYPES})
    plan.predicted = predict(ckpt, plan)
    return plan


def synthetic_model(work: Path, quick: bool) -> Path:
    """The synthetic checkpoint's folder, built unless already in ``work``."""
    from mc_gguf.hf.tiny import build_tiny_mixtral

    spec = model_spec(quick)
    model_dir = work / f"model-{spec.hidden_size}x{spec.intermediate_size}x{spec.num_hidden_layers}"
    if not (model_dir / "config.json").exists():
        print(f"building the synthetic model in {model_dir} ...", file=sys.stderr, flush=True)
        build_tiny_mixtral(model_dir, spec)
    return model_dir


def build_files(work: Path, quick: bool, only_uniform: bool = False) -> dict[str, Path]:
    """The synthetic checkpoint and its GGUF files (only the uniform one: ``only_uniform``), reused when already
    in ``work``."""
    from mc_gguf.allocate.allocation import uniform_plan
    from mc_gguf.gguf_io.regroup import regroup_experts
    from mc_gguf.hf.checkpoint import open_checkpoint
    from mc_gguf.quantize.quantization import quantize

    model_dir = synthetic_model(work, quick)
    ckpt = open_checkpoint(model_dir)
    files = {"uniform": model_dir.with_name(model_dir.name + f"-{UNIFORM_TYPE}.gguf"),
             **{f"uniform {t}": model_dir.with_name(model_dir.name + f"-{t}.gguf") for t in OTHER_MIXED_TYPES},
             "one_group": model_dir.with_name(model_dir.name + f"-{UNIFORM_TYPE}-per-expert.gguf"),
             "per_expert": model_dir.with_name(model_dir.name + "-mixed.gguf")}
    if only_uniform:
        files = {"uniform": files["uniform"]}
    one_group = replace(uniform_plan(ckpt, UNIFORM_TYPE, Q8_NON_EXPERT), layout="per-expert")
    plans = {"uniform": uniform_plan(ckpt, UNIFORM_TYPE, Q8_NON_EXPERT), "one_group": one_group,
             **{f"uniform {t}": uniform_plan(ckpt, t, Q8_NON_EXPERT) for t in OTHER_MIXED_TYPES},
             "per_expert": mixed_plan(ckpt)}
    for name, path in files.items():
        if not path.exists():
            print(f"quantizing {path.name} ...", file=sys.stderr, flush=True)
            quantize(model_dir, plans[name], path, progress=not quick)
    if only_uniform:
        return files
    # the uniform file's very bytes in the mixed file's groups: what the groups alone cost
    files["q4_groups"] = model_dir.with_name(model_dir.name + f"-{UNIFORM_TYPE}-groups.gguf")
    if not files["q4_groups"].exists():
        types = plans["per_expert"].projection_types(0, "gate")
        partition = {g: [x for x, t in enumerate(types) if t == name] for g, name in enumerate(sorted(set(types)))}
        regroup_experts(files["uniform"], files["q4_groups"], partition)
    return files


@dataclass(frozen=True)
class Case:
    """One file run in its own process: on the stock or the patched runtime, pruned at ``mu`` or not."""
    name: str
    path: Path
    stock: bool = False          # the unpatched build of the same sdist
    odp: bool = False
    mu: float | None = None      # the one threshold of every layer (found for target_skip)
    target_skip: float | None = None


def bytes_per_token(path: Path, slots_per_layer: float | None = None) -> float:
    """Bytes a decoded token reads (evaluate/bench.py token_bytes: every matrix but the embedding table, and
    per layer the experts' mean size per slot), with ``slots_per_layer`` slots kept (None: all it uses)."""
    need = token_bytes(path)
    kept = [1.0 if slots_per_layer is None or not n else slots_per_layer / n for n in need.n_used]
    return need.per_token([1 - k for k in kept])


def read_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> dict:
    """Read bandwidth in bytes/s: a streaming float32 sum, one thread per core (numpy releases the GIL)."""
    data = np.ones(n_bytes // 4, dtype=np.float32)
    chunks = np.array_split(data, N_THREADS)
    best = {}
    for threads, parts in (("single_thread", [data]), ("all_threads", chunks)):
        times = []
        with ThreadPoolExecutor(len(parts)) as pool:
            for _ in range(repeats):
                started = time.perf_counter()
                list(pool.map(np.add.reduce, parts))
                times.append(time.perf_counter() - started)
        best[threads] = data.nbytes / min(times)
    return best


def decoded_slots(computed: int, skipped: int, n_tokens: int, n_layers: int) -> dict:
    """The decoded tokens' skipped share of expert slots and slots run per token and layer, from the
    runtime's slot counters."""
    return {"decode_skip_share": skipped / (computed + skipped) if computed + skipped else 0.0,
            "decode_slots_per_token": computed / n_tokens / n_layers}


def measure(path: Path, *, odp: bool, mu: float | None, stock: bool, prompt: list[int], decode: list[int],
            repeats: int) -> dict:
    """Prefill and decode tokens/s (medians) in this process; slot counts from the patched runtime."""
    kwargs = dict(n_ctx=len(prompt) + len(decode) + 8, n_batch=len(prompt), n_threads=N_THREADS,
                  n_threads_batch=N_THREADS, verbose=False)
    if stock:
        from llama_cpp import Llama

        llm = Llama(model_path=str(path), **kwargs)
    else:
        from mc_gguf.loader.model import load

        llm = load(path, odp=odp, mu=mu, **kwargs)
    prefill, decoding = [], []
    for _ in range(repeats + 1):  # the first run warms the page cache and is not counted
        llm.reset()
        if not stock:
            llm.reset_expert_stats()
        started = time.perf_counter()
        llm.eval(prompt)
        middle = time.perf_counter()
        if not stock:
            after_prompt = llm.expert_stats()
        for token in decode:
            llm.eval([token])
        ended = time.perf_counter()
        prefill.append(len(prompt) / (middle - started))
        decoding.append(len(decode) / (ended - middle))
    out = {"prefill_tok_s": float(np.median(prefill[1:] or prefill)),
           "decode_tok_s": float(np.median(decoding[1:] or decoding)),
           "decode_runs": [round(v, 2) for v in decoding[1:] or decoding]}
    if not stock:
        total = llm.expert_stats()
        out.update(decoded_slots(sum(total.computed) - sum(after_prompt.computed),
                                 sum(total.skipped) - sum(after_prompt.skipped), len(decode), len(total.computed)))
    return out


def paired_decode(paths: dict[str, str], prompt: list[int], decode: list[int], block: int,
                  mus: dict[str, float] | None = None) -> dict:
    """Decode speed of several files in one process, in alternating blocks of ``block`` tokens.

    Every file decodes the same token stream at the same positions; block i of every file
    runs before block i + 1 of any (every other turn in reverse order), so drift slower than
    a few blocks (other tenants, clock changes) lands on all files alike. Per file: tokens/s
    over all blocks, and each block's time over the first file's time in the same block,
    whose quartiles say how tight the comparison is. ``mus``: the files that decode with
    ODP at that threshold (every layer), with their skipped share of the decoded slots.
    """
    from mc_gguf.loader.model import load

    mus = mus or {}
    kwargs = dict(n_ctx=len(prompt) + len(decode) + 8, n_batch=len(prompt), n_threads=N_THREADS,
                  n_threads_batch=N_THREADS, verbose=False)
    models = {name: load(path, odp=name in mus, mu=mus.get(name), **kwargs) for name, path in paths.items()}
    for llm in models.values():
        llm.eval(prompt)
        llm.eval(decode[:1])  # warm: page cache, graph
        llm.reset_expert_stats()
    seconds = {name: [] for name in models}
    for turn, start in enumerate(range(1, len(decode), block)):
        # every other turn in reverse order, so that no file always follows the same one
        for name, llm in (list(models.items()) if turn % 2 == 0 else list(models.items())[::-1]):
            started = time.perf_counter()
            for token in decode[start:start + block]:
                llm.eval([token])
            seconds[name].append(time.perf_counter() - started)
    first = seconds[next(iter(models))]
    n_tokens = len(decode) - 1
    out = {}
    for name, times in seconds.items():
        ratios = np.array(first) / np.array(times)  # > 1: faster than the first file
        out[name] = {"decode_tok_s": n_tokens / sum(times),
                     "speed_ratio": sum(first) / sum(times),
                     "block_ratio_quartiles": [float(q) for q in np.quantile(ratios, [0.25, 0.5, 0.75])]}
        if name in mus:
            stats = models[name].expert_stats()
            out[name].update(mu=mus[name], **decoded_slots(sum(stats.computed), sum(stats.skipped), n_tokens,
                                                           len(stats.computed)))
    return out


def find_mu(path: Path, target: float, decode: list[int], iterations: int) -> float:
    """The threshold (every layer) whose decode skip share is closest to ``target``: bisection."""
    low, high = 0.0, 1.0
    best = (1.0, 0.0)
    for _ in range(iterations):
        mu = (low + high) / 2
        share = measure(path, odp=True, mu=mu, stock=False, prompt=decode[:8], decode=decode, repeats=0)[
            "decode_skip_share"]
        best = min(best, (abs(share - target), mu))
        low, high = (mu, high) if share < target else (low, mu)
    return best[1]


def odp_name(share: float) -> str:
    return f"uniform {UNIFORM_TYPE}, ODP {share:.0%} skip"


def paired_odp_decode(path: Path, mus: dict[str, float], prompt: list[int], stream: list[int], block: int) -> dict:
    """The file decoding ``stream`` unpruned and with ODP at each of ``mus``, paired in one process."""
    return in_subprocess({"paths": {f"uniform {UNIFORM_TYPE}": str(path), **{name: str(path) for name in mus}},
                          "mus": mus, "prompt": prompt, "decode": stream, "block": block}, False)


def odp_decode_summary(paired_odp: dict, path: Path, by_name: dict | None = None, base: dict | None = None) -> dict:
    """Per skip share: the decode speedups (paired in one process, and from separate processes
    where ``by_name`` has them) and the most that skipping can give, the bandwidth limit's own
    ratio: bytes of an unpruned token over bytes of a pruned one (the non-expert matrices are
    read either way)."""
    unpruned, dense = bytes_per_token(path), token_bytes(path).dense
    out = {}
    for name, paired in paired_odp.items():
        if "mu" not in paired:
            continue
        slots = paired["decode_slots_per_token"]
        out[name] = {"mu": paired["mu"], "paired_skip_share": paired["decode_skip_share"],
                     "paired_decode_ratio": paired["speed_ratio"],
                     "paired_block_ratio_quartiles": paired["block_ratio_quartiles"],
                     "bandwidth_limit_ratio": unpruned / bytes_per_token(path, slots),
                     "expert_share_of_token_bytes": 1 - dense / unpruned}
        if by_name and base:
            out[name].update(separate_skip_share=by_name[name]["decode_skip_share"],
                             separate_decode_ratio=by_name[name]["decode_tok_s"] / base["decode_tok_s"])
    return out


def token_streams(n_prompt: int, n_decode: int, n_paired: int) -> tuple[list[int], list[int], list[int]]:
    """The seeded prompt, the decoded tokens of the separate runs and the paired comparison's stream:
    ids from 3 upward, random text tokens, never BOS/EOS/UNK."""
    rng = np.random.default_rng(0)
    return tuple(rng.integers(3, 32000, n).tolist() for n in (n_prompt, n_decode, n_paired + 1))


def odp_speed(work: Path, shares: list[float], quick: bool = False, paired_tokens: int = 768,
              block: int = 2) -> dict:
    """Decode speed of the bandwidth-bound model with ODP at each skip share against unpruned, paired
    in one process (bench_odp.py's speed figures): the uniform Q4_K file only, each share's threshold
    found by bisection on the runtime's slot counters."""
    path = build_files(work, quick, only_uniform=True)["uniform"]
    prompt, decode, stream = token_streams(16, 16 if quick else 64, 16 if quick else paired_tokens)
    mus = {odp_name(share): find_mu(path, share, decode, iterations=3 if quick else 10) for share in shares}
    paired = paired_odp_decode(path, mus, prompt, stream, 4 if quick else block)
    return {"model": {**asdict(model_spec(quick)), "file_mb": path.stat().st_size / 1e6}, "threads": N_THREADS,
            "tokens": len(stream) - 1, "odp_decode": odp_decode_summary(paired, path)}


def run_case(args_json: str) -> int:
    """Worker: measure one case (or one paired set) in a fresh process, print its JSON."""
    case = json.loads(args_json)
    if "paths" in case:
        print(json.dumps(paired_decode(**case)))
        return 0
    case["path"] = Path(case["path"])
    print(json.dumps(measure(**case)))
    return 0


def in_subprocess(case: dict, stock: bool) -> dict:
    env = dict(os.environ)
    if stock:
        from mc_gguf.runtime.stock import stock_library_dir

        env["LLAMA_CPP_LIB_PATH"] = str(stock_library_dir())
    if "path" in case:
        case = {**case, "path": str(case["path"]), "stock": stock}
    result = subprocess.run([sys.executable, __file__, "--worker", json.dumps(case)], env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"measuring {case.get('path') or list(case['paths'].values())} failed:\n"
                           f"{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def plot(report: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = report["cases"]
    names = [c["name"] for c in cases]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    axes[0].barh(names, [c["decode_tok_s"] for c in cases], color="tab:blue", label="achieved")
    axes[0].scatter([c["limit_tok_s"] for c in cases], names, color="black", marker="|", s=300,
                    label="bandwidth limit")
    axes[0].set_xlabel("decode tokens/s")
    axes[0].legend(loc="lower right")
    axes[1].barh(names, [c["prefill_tok_s"] for c in cases], color="tab:orange")
    axes[1].set_xlabel("prefill tokens/s")
    for ax in axes:
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{report['model']['file_mb']:.0f} MB synthetic Mixtral, {report['threads']} threads, "
                 f"read bandwidth {report['bandwidth_gb_s']:.1f} GB/s")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=256, help="prefill length (default: 256)")
    parser.add_argument("--decode-tokens", type=int, default=64, help="decoded tokens per run (default: 64)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds, median reported (default: 5)")
    parser.add_argument("--paired-tokens", type=int, default=768,
                        help="tokens each file decodes in the paired comparison (default: 768)")
    parser.add_argument("--paired-block", type=int, default=2,
                        help="tokens per turn in the paired comparison (default: 2)")
    parser.add_argument("--no-stock", action="store_true", help="skip the unpatched llama.cpp baseline")
    add_output_flags(parser, "build/bench-speed", "where the model and GGUF files go",
                     quick_help="tiny model, one run each, no stock build")
    parser.add_argument("--png", help="write a bar chart here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_case(args.worker)
    if args.quick:
        args.prompt_tokens, args.decode_tokens, args.repeats, args.no_stock = 32, 16, 1, True
        args.paired_tokens, args.paired_block = 16, 4

    started = time.perf_counter()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    files = build_files(work, args.quick)
    prompt, decode, paired_stream = token_streams(args.prompt_tokens, args.decode_tokens, args.paired_tokens)
    specs = []
    if not args.no_stock:
        specs.append(Case(f"uniform {UNIFORM_TYPE}, stock llama.cpp", files["uniform"], stock=True))
    specs += [Case(f"uniform {UNIFORM_TYPE}", files["uniform"]),
              Case(f"per-expert layout, one {UNIFORM_TYPE} group", files["one_group"]),
              Case("per-expert Q3_K/Q4_K/Q5_K", files["per_expert"])]
    specs += [Case(f"uniform {t}", files[f"uniform {t}"]) for t in OTHER_MIXED_TYPES]
    for target in SKIP_SHARES:
        mu = find_mu(files["uniform"], target, decode, iterations=3 if args.quick else 10)
        specs.append(Case(odp_name(target), files["uniform"], odp=True, mu=mu, target_skip=target))

    # rounds over all cases, one run of each per round in a fresh process: the machine's drift
    # (other tenants, frequency) lands on every case alike; medians over the rounds
    bandwidths = []
    runs: dict[str, list[dict]] = {spec.name: [] for spec in specs}
    for round_ in range(args.repeats):
        bandwidths.append(read_bandwidth(1 << 26 if args.quick else 1 << 30, repeats=3))
        for spec in specs:
            runs[spec.name].append(in_subprocess({"path": spec.path, "odp": spec.odp, "mu": spec.mu, "prompt": prompt,
                                                  "decode": decode, "repeats": 1}, spec.stock))
        print(f"round {round_ + 1}/{args.repeats}: " + ", ".join(
            f"{name} {r[-1]['decode_tok_s']:.1f}" for name, r in runs.items()), file=sys.stderr, flush=True)
    bandwidth = {k: float(np.median([b[k] for b in bandwidths])) for k in bandwidths[0]}

    # the layouts and types side by side in one process, alternating blocks of tokens: a much
    # tighter comparison than separate processes, whose speeds drift apart by several percent
    paired_names = {f"uniform {UNIFORM_TYPE}": "uniform", f"per-expert layout, one {UNIFORM_TYPE} group": "one_group",
                    "per-expert Q3_K/Q4_K/Q5_K": "per_expert",
                    f"per-expert layout, three {UNIFORM_TYPE} groups": "q4_groups",
                    **{f"uniform {t}": f"uniform {t}" for t in OTHER_MIXED_TYPES}}
    paired = in_subprocess({"paths": {name: str(files[key]) for name, key in paired_names.items()},
                            "prompt": prompt[:16], "decode": paired_stream, "block": args.paired_block}, False)
    print("paired decode: " + ", ".join(f"{name} {r['speed_ratio']:.3f}x" for name, r in paired.items()),
          file=sys.stderr, flush=True)
    # the pruned decodes against the unpruned one the same way: one file, loaded once per threshold
    paired_odp = paired_odp_decode(files["uniform"], {spec.name: spec.mu for spec in specs if spec.odp}, prompt[:16],
                                   paired_stream, args.paired_block)
    print("paired ODP decode: " + ", ".join(f"{name} {r['speed_ratio']:.3f}x" for name, r in paired_odp.items()),
          file=sys.stderr, flush=True)

    cases = []
    for spec in specs:
        name, path = spec.name, spec.path
        measured = runs[name]
        result = {key: float(np.median([r[key] for r in measured]))
                  for key in measured[0] if key != "decode_runs"}
        result["decode_runs"] = [round(r["decode_tok_s"], 2) for r in measured]
        token_bytes_read = bytes_per_token(path, result.get("decode_slots_per_token"))  # per layer, after pruning
        limit = bandwidth["all_threads"] / token_bytes_read
        case = {"name": name, "file": path.name, "file_mb": path.stat().st_size / 1e6, "stock_runtime": spec.stock,
                "mu": spec.mu, "target_skip": spec.target_skip, **result, "bytes_per_token": token_bytes_read,
                "limit_tok_s": limit, "achieved_over_limit": result["decode_tok_s"] / limit}
        cases.append(case)
        print(f"{name:36s} prefill {case['prefill_tok_s']:8.1f} tok/s  decode {case['decode_tok_s']:7.2f} tok/s  "
              f"limit {limit:7.2f}  ({case['achieved_over_limit']:.0%})", file=sys.stderr, flush=True)

    by_name = {c["name"]: c for c in cases}
    base = by_name[f"uniform {UNIFORM_TYPE}"]
    # a decoded token's time if each slot took the time its expert's type takes in a uniform file
    seconds_per_token = {t: 1 / by_name[f"uniform {t}"]["decode_tok_s"] for t in set(MIXED_TYPES)}
    type_weighted = 1 / float(np.mean([seconds_per_token[t] for t in MIXED_TYPES]))
    paired_expected = 1 / float(np.mean([1 / paired[f"uniform {t}"]["speed_ratio"] for t in MIXED_TYPES]))
    report = {
        "model": {**asdict(model_spec(args.quick)), "file_mb": files["uniform"].stat().st_size / 1e6,
                  "per_expert_file_mb": files["per_expert"].stat().st_size / 1e6},
        "threads": N_THREADS, "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
        "bandwidth_gb_s": bandwidth["all_threads"] / 1e9, "bandwidth_single_thread_gb_s": bandwidth["single_thread"] / 1e9,
        "cases": cases,
        "mixed_decode_expected_from_its_types_tok_s": type_weighted,
        "mixed_over_expected": by_name["per-expert Q3_K/Q4_K/Q5_K"]["decode_tok_s"] / type_weighted,
        "paired_decode": {"tokens": args.paired_tokens, "block": args.paired_block, "files": paired,
                          "mixed_expected_ratio_from_its_types": paired_expected,
                          "mixed_over_expected": paired["per-expert Q3_K/Q4_K/Q5_K"]["speed_ratio"] / paired_expected},
        "ratios_vs_uniform": {c["name"]: {"decode": c["decode_tok_s"] / base["decode_tok_s"],
                                          "prefill": c["prefill_tok_s"] / base["prefill_tok_s"]} for c in cases},
        "odp_decode": odp_decode_summary(paired_odp, files["uniform"], by_name, base),
        "seconds": round(time.perf_counter() - started, 1),
    }
    emit_json(report, args.json, indent=1)
    if args.png:
        plot(report, Path(args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
