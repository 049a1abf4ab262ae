#!/usr/bin/env python3
"""Time and memory of every stage at Mixtral 8x7B's real shapes, side by side with llama.cpp's own tools.

Builds a checkpoint with Mixtral 8x7B's exact layer shapes (hidden 4096, 8
experts of 14336, 32 query / 8 KV heads, vocabulary 32000, its tokenizer) and
N decoder layers of seeded random bf16 weights, written one layer at a time
(random weights time and size the work exactly as trained ones do). For
each N it runs every mc-gguf stage as its own process (convert, calibrate,
allocate, quantize, eval --ref, odp-calibrate; compress with --compress)
and, on the same F16 file and the same calibration tokens, llama.cpp's own
convert_hf_to_gguf.py, llama-imatrix and llama-quantize (unpatched, built
from the same sdist). Each process's wall time and peak RSS (its own
rusage; this process stays small, since a child's peak includes its
parent's at exec) are recorded, and on Linux its peak anonymous memory
(RssAnon, sampled every 0.1 s): RSS also counts the pages of the files a
process maps, which the kernel drops under pressure and reads again. Prints one JSON object: per stage and N the seconds
and GiB, the ratios against llama.cpp's tools measured in the same run, the
seconds per layer extrapolated to Mixtral's 32 layers, and memory flatness
(largest N against the next).

``--defaults`` measures what a user types instead, `mc-gguf compress MODEL
--bits B` with no other flag (tuning, every candidate type, a type per
projection), against llama-imatrix + llama-quantize to IQ2_XS and IQ2_S on
the same F16 file and tokens, at each N: the ratios per added layer, the
fixed costs (what N layers cost beyond N times the per-layer cost) as a
share of a 32-layer run, and each process's CPU use (user + system seconds
over wall seconds times cores: 1.0 is every core busy throughout). compress runs under trace_memory.py, so
the report also names the mc_gguf functions its anonymous memory peaked in.

``--ray`` times `mc-gguf calibrate` and `mc-gguf quantize --tune` (on the same statistics and plan) in one process
and with `--ray` on a local cluster (``--nodes`` nodes of one CPU each, started by the script in network and PID
namespaces of its own), checks each pair of files is the same, and models the speed-up of 4 and 16 machines
from the measured times: per layer the driver's serial part (the calibration's forward) plus the layer's
experts (their errors, GPTQ and tuning) spread over the machines.

    python scripts/bench_scale.py --layers 1 2 4 [--tokens 4096 --seq-len 2048] [--json scale.json]
    python scripts/bench_scale.py --ray --layers 1 [--experts 2 --tune-iters 2] [--ray-stages calibrate]
    python scripts/bench_scale.py --defaults --layers 2 4 [--tokens 4096]
    python scripts/bench_scale.py --calibrate-only --layers 1 2 [--experts 2]   (calibrate against llama-imatrix)
    python scripts/bench_scale.py --quick [--defaults]   (the tiny model's shapes: checks the script works)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_common import add_output_flags, emit_json

from mc_gguf.quantize.settings import TuneSettings

MIXTRAL_8X7B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
                "vocab_size": 32000, "max_position_embeddings": 32768, "rope_theta": 1e6, "n_layers_full": 32}
QUICK_SHAPES = {**MIXTRAL_8X7B, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
                "num_key_value_heads": 2, "num_local_experts": 4}
GIB = 1 << 30


def build_checkpoint(out: Path, shapes: dict, n_layers: int, seed: int = 0) -> Path:
    """A Mixtral checkpoint with ``shapes`` and ``n_layers`` layers of seeded random bf16, one shard per layer."""
    import torch
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    from mc_gguf.hf.tiny import save_mixtral_tokenizer

    if (out / "model.safetensors.index.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    hidden, ff, n_expert = shapes["hidden_size"], shapes["intermediate_size"], shapes["num_local_experts"]
    head_dim = hidden // shapes["num_attention_heads"]
    kv = shapes["num_key_value_heads"] * head_dim
    config = MixtralConfig(**{k: v for k, v in shapes.items() if k != "n_layers_full"}, num_hidden_layers=n_layers,
                           sliding_window=None, tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=1,
                           eos_token_id=2, dtype="bfloat16", architectures=["MixtralForCausalLM"])
    config.save_pretrained(out)
    save_mixtral_tokenizer(out)
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    def norm(n: int) -> torch.Tensor:
        return (1 + 0.1 * torch.randn(n, generator=gen)).to(torch.bfloat16)

    weight_map = {}
    shards = {"model-embed.safetensors": {"model.embed_tokens.weight": rand(shapes["vocab_size"], hidden),
                                          "model.norm.weight": norm(hidden),
                                          "lm_head.weight": rand(shapes["vocab_size"], hidden)}}
    for il in range(n_layers):
        p = f"model.layers.{il}."
        layer = {p + "input_layernorm.weight": norm(hidden), p + "post_attention_layernorm.weight": norm(hidden),
                 p + "self_attn.q_proj.weight": rand(hidden, hidden), p + "self_attn.k_proj.weight": rand(kv, hidden),
                 p + "self_attn.v_proj.weight": rand(kv, hidden), p + "self_attn.o_proj.weight": rand(hidden, hidden),
                 p + "block_sparse_moe.gate.weight": rand(n_expert, hidden, std=0.5)}
        for e in range(n_expert):
            q = f"{p}block_sparse_moe.experts.{e}."
            layer.update({q + "w1.weight": rand(ff, hidden), q + "w3.weight": rand(ff, hidden),
                          q + "w2.weight": rand(hidden, ff)})
        shards[f"model-layer-{il:03d}.safetensors"] = layer
        save_file(layer, out / f"model-layer-{il:03d}.safetensors", metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(layer, f"model-layer-{il:03d}.safetensors"))
        del layer
    embed = shards.pop("model-embed.safetensors")
    save_file(embed, out / "model-embed.safetensors", metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(embed, "model-embed.safetensors"))
    index = {"metadata": {"total_size": sum((out / f).stat().st_size for f in set(weight_map.values()))},
             "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return out


class AnonymousPeak(threading.Thread):
    """Peak anonymous resident memory of a running process (Linux: RssAnon in /proc/PID/status, sampled).

    A process's RSS also counts the pages of files it maps (a GGUF that llama.cpp runs): the
    kernel drops those under pressure and reads them again, so they bound nothing. Anonymous
    memory (heaps, buffers, copies) is what a machine must hold. None where /proc is absent.
    """

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.path, self.interval, self.peak = Path(f"/proc/{pid}/status"), interval, None

    def run(self) -> None:
        while True:
            try:
                text = self.path.read_text()
            except OSError:  # reaped
                return
            for line in text.splitlines():
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak or 0, int(line.split()[1]) * 1024)
            time.sleep(self.interval)


def measure(name: str, cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` as its own process: wall seconds, peak resident memory (its rusage, GiB) and
    peak anonymous memory (sampled, Linux)."""
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        sampler = AnonymousPeak(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-20:]
        raise RuntimeError(f"{name} failed ({proc.returncode}; log {log}):\n" + "\n".join(tail))
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux
    cpu = (usage.ru_utime + usage.ru_stime) / max(seconds, 1e-9) / (os.cpu_count() or 1)
    row = {"seconds": round(seconds, 1), "peak_rss_gib": round(rss / GIB, 2), "cpu_use": round(cpu, 2)}
    if sampler.peak is not None:
        row["peak_anon_gib"] = round(sampler.peak / GIB, 2)
    print(f"  {name:22s} {row['seconds']:8.1f} s  {row['peak_rss_gib']:6.2f} GiB"
          f"  (anonymous {row.get('peak_anon_gib', float('nan')):.2f})", file=sys.stderr, flush=True)
    return row


def resume_check(cmd: list[str], stats: Path, reference: Path, log: Path) -> dict:
    """Kill the calibration (SIGKILL) once its work folder holds the last finished step before the last layer's
    (a layer's statistics, or with one layer the embeddings), run it again, and compare with ``reference``."""
    import signal

    from safetensors.numpy import load_file

    work = Path(str(stats) + ".partial.d")
    n_layers = json.loads((Path(cmd[cmd.index("calibrate") + 1]) / "config.json").read_text())["num_hidden_layers"]
    marker = work / (f"layer-{n_layers - 2}.safetensors" if n_layers > 1 else "hidden-0.f32")
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}   (killed once {marker.name} exists)\n")
        out.flush()
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        while not marker.exists() and proc.poll() is None:
            time.sleep(0.5)
        killed_after = time.perf_counter() - started
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resumed = measure("calibrate, resumed", cmd, log)
    a, b = load_file(str(stats)), load_file(str(reference))
    same = a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    stats.unlink()
    return {"killed_after_s": round(killed_after, 1), "resumed": resumed, "same_statistics": bool(same)}


def checkpoint_folder(folder: Path, shapes: dict, n_layers: int) -> tuple[Path, Path]:
    """``folder`` with the checkpoint of ``n_layers`` built in ``folder/model``: (folder, model)."""
    folder.mkdir(parents=True, exist_ok=True)
    # built in a process of its own: a child inherits its parent's peak RSS at exec (Linux keeps the
    # high-water mark of the image it replaces), so this process must stay small for the figures to be the stages'
    builder = multiprocessing.get_context("spawn").Process(target=build_checkpoint,
                                                           args=(folder / "model", shapes, n_layers))
    builder.start()
    builder.join()
    if builder.exitcode != 0:
        raise RuntimeError(f"building the {n_layers}-layer checkpoint failed")
    return folder, folder / "model"


def discard(paths, model: Path, args) -> None:
    """A run's files gone, and its checkpoint unless --keep-models."""
    for path in paths:
        path.unlink(missing_ok=True)
    if not args.keep_models:
        shutil.rmtree(model)


def imatrix_command(tools: Path, f16: Path, text: Path, folder: Path, args) -> list[str]:
    """llama-imatrix on the F16 file and the calibration tokens, writing folder/imatrix.gguf."""
    return [str(tools / "llama-imatrix"), "-m", str(f16), "-f", str(text), "-o", str(folder / "imatrix.gguf"),
            "--output-format", "gguf", "-c", str(args.seq_len), "--chunks", str(max(1, args.tokens // args.seq_len)),
            "-t", str(os.cpu_count() or 1)]


def run_layers(n_layers: int, shapes: dict, args, work: Path, text: Path, eval_text: Path) -> dict:
    from mc_gguf.runtime.source import BuildFlags, patched_source
    from mc_gguf.runtime.stock import stock_tools_dir

    folder, model = checkpoint_folder(work / f"layers-{n_layers}", shapes, n_layers)
    log = folder / "log.txt"
    mc = str(Path(sys.executable).parent / "mc-gguf")
    tools = stock_tools_dir()
    llama_src = patched_source(BuildFlags(stock=True))
    threads = str(os.cpu_count() or 1)
    f16, stats, plan = folder / "f16.gguf", folder / "stats.safetensors", folder / "plan.json"
    out = folder / f"mc-{args.bits}.gguf"
    calib = ["--tokens", str(args.tokens), "--seq-len", str(args.seq_len)]
    types = ["--types", *args.types] if args.types else []
    print(f"{n_layers} layer(s):", file=sys.stderr, flush=True)
    rows = {}
    rows["mc convert"] = measure("mc-gguf convert", [mc, "convert", str(model), "-o", str(f16), "--type", "f16",
                                                      "-q"], log)
    rows["mc calibrate"] = measure("mc-gguf calibrate", [mc, "calibrate", str(model), "--text", str(text), *calib,
                                                          *types, "-o", str(stats), "-q"], log)
    if args.calibrate_only:  # calibrate's target alone: its statistics against llama-imatrix's, same F16 and tokens
        rows["llama-imatrix"] = measure("llama-imatrix", imatrix_command(tools, f16, text, folder, args), log)
        discard((f16, stats, folder / "imatrix.gguf"), model, args)
        return {"stages": rows}
    rows["llama convert"] = measure("convert_hf_to_gguf.py", [
        sys.executable, str(llama_src / "convert_hf_to_gguf.py"), str(model), "--outtype", "f16",
        "--outfile", str(folder / "llama-f16.gguf")], log, env={"PYTHONPATH": str(llama_src / "gguf-py")})
    (folder / "llama-f16.gguf").unlink()
    rows["mc allocate"] = measure("mc-gguf allocate", [mc, "allocate", str(stats), "--bits", str(args.bits),
                                                        "--model", str(model), "-o", str(plan)], log)
    rows["mc quantize"] = measure("mc-gguf quantize", [mc, "quantize", str(model), "--plan", str(plan),
                                                        "--stats", str(stats), "-o", str(out), "-q"], log)
    rows["mc eval --ref"] = measure("mc-gguf eval --ref", [mc, "eval", str(out), "--text", str(eval_text), "--ref",
                                                            str(f16), "--ctx", str(args.ctx), "--chunks", "2"], log)
    rows["mc odp-calibrate"] = measure("mc-gguf odp-calibrate", [
        mc, "odp-calibrate", str(model), str(out), "--text", str(text), "--skip", "0.15", *calib,
        "-o", str(folder / "odp.gguf")], log)
    resume = None
    if args.resume_check:
        resume = resume_check(
            [mc, "calibrate", str(model), "--text", str(text), *calib, *types, "-o",
             str(folder / "resumed.safetensors"), "-q"], folder / "resumed.safetensors", stats, log)
    if args.compress:
        rows["mc compress"] = measure("mc-gguf compress", [mc, "compress", str(model), "--bits", str(args.bits),
                                                            "--calib", str(text), *calib, *types, "-o",
                                                            str(folder / "compressed.gguf"), "-q"], log)
    imatrix = folder / "imatrix.gguf"
    rows["llama-imatrix"] = measure("llama-imatrix", imatrix_command(tools, f16, text, folder, args), log)
    rows["llama-quantize"] = measure(f"llama-quantize {args.llama_type}", [
        str(tools / "llama-quantize"), "--imatrix", str(imatrix), str(f16), str(folder / "llama.gguf"),
        args.llama_type, threads], log)
    sizes = {"mc_gguf_mb": out.stat().st_size / 1e6, "llama_mb": (folder / "llama.gguf").stat().st_size / 1e6}
    discard((f16, out, folder / "llama.gguf", folder / "odp.gguf", folder / "compressed.gguf", imatrix), model, args)
    return {"stages": rows, "files": sizes, **({"calibrate_killed_and_resumed": resume} if resume else {})}


def run_defaults(n_layers: int, shapes: dict, args, work: Path, text: Path) -> dict:
    """`mc-gguf compress --bits B` with its defaults, and llama.cpp's imatrix + quantize (IQ2_XS, IQ2_S) on the same
    F16 file and tokens, for one checkpoint of ``n_layers`` layers."""
    from mc_gguf.runtime.stock import stock_tools_dir

    folder, model = checkpoint_folder(work / f"defaults-{n_layers}", shapes, n_layers)
    log = folder / "log.txt"
    mc = str(Path(sys.executable).parent / "mc-gguf")
    tools = stock_tools_dir()
    threads = str(os.cpu_count() or 1)
    f16 = folder / "f16.gguf"
    print(f"{n_layers} layer(s), compress's defaults:", file=sys.stderr, flush=True)
    rows = {"mc convert": measure("mc-gguf convert", [mc, "convert", str(model), "-o", str(f16), "--type", "f16",
                                                       "-q"], log)}
    # the calibration's text and tokens are the only flags besides --bits: llama-imatrix reads the same ones.
    # compress runs under trace_memory.py (mc-gguf's entry point in a process that samples where its memory peaks)
    trace = folder / "compress-memory.json"
    rows["mc compress"] = measure("mc-gguf compress", [
        sys.executable, str(Path(__file__).resolve().parent / "trace_memory.py"), "--json", str(trace), "--",
        "compress", str(model), "--bits", str(args.bits), "--calib", str(text), "--tokens", str(args.tokens),
        "--seq-len", str(args.seq_len), "-o", str(folder / "compressed.gguf"), "-q"], log)
    traced = json.loads(trace.read_text())
    rows["mc compress"]["memory_trace"] = {"peak_anon_gib": traced["peak_anon_gib"],
                                           "peak_stack": traced["peak_stack"][:6],
                                           "peak_anon_gib_by_function": traced["peak_anon_gib_by_function"]}
    imatrix = folder / "imatrix.gguf"
    rows["llama-imatrix"] = measure("llama-imatrix", imatrix_command(tools, f16, text, folder, args), log)
    for llama_type in ("IQ2_XS", "IQ2_S"):
        rows[f"llama-quantize {llama_type}"] = measure(f"llama-quantize {llama_type}", [
            str(tools / "llama-quantize"), "--imatrix", str(imatrix), str(f16), str(folder / "llama.gguf"),
            llama_type, threads], log)
    sizes = {"mc_gguf_mb": (folder / "compressed.gguf").stat().st_size / 1e6}
    discard((f16, folder / "compressed.gguf", folder / "llama.gguf", imatrix), model, args)
    return {"stages": rows, "files": sizes}


RAY_PORT = 6390


def in_own_namespaces() -> None:
    """Run this script again in network, PID and mount namespaces of its own (--ray): Ray's servers bind every
    interface, and there the loopback is the only one; every process the script starts ends with it, and Ray's
    files in /tmp/ray with its mounts."""
    if os.environ.get("MC_GGUF_BENCH_NAMESPACES") != "1":
        if shutil.which("unshare") is None:
            raise SystemExit("--ray starts a local Ray cluster in a network namespace of its own: it needs unshare")
        os.execvpe("unshare", ["unshare", "--net", "--pid", "--fork", "--mount-proc", sys.executable, *sys.argv],
                   {**os.environ, "MC_GGUF_BENCH_NAMESPACES": "1"})
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    ray_files = Path("/tmp/ray")  # Ray's sessions and address file: a tmpfs this mount namespace alone sees
    ray_files.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(ray_files)], check=True)


def start_ray_cluster(nodes: int) -> str:
    """A head and nodes - 1 worker nodes on this machine, one CPU each (`ray start`): the head's address."""
    ray = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    address = f"127.0.0.1:{RAY_PORT}"
    commands = [[ray, "start", "--head", "--port", str(RAY_PORT), "--num-cpus", "1", "--include-dashboard=false",
                 "--disable-usage-stats"]]
    commands += [[ray, "start", "--address", address, "--num-cpus", "1"]] * (nodes - 1)
    for command in commands:
        subprocess.run(command, check=True, env=env, capture_output=True, timeout=120)
    return address


def run_ray(n_layers: int, shapes: dict, args, work: Path, text: Path, address: str) -> dict:
    """`mc-gguf calibrate` and `mc-gguf quantize --tune` in one process and with --ray on the local cluster (the
    same text; quantize on the same statistics and plan: compress's cost, a type per projection): the seconds of
    each, and whether their files are the same. The calibration's forward alone (its serial part on a cluster) is
    timed as a calibration measuring Q8_0 only (its errors cost a second or two per expert)."""
    import hashlib

    folder, model = checkpoint_folder(work / f"ray-{n_layers}", shapes, n_layers)
    log = folder / "log.txt"
    mc = str(Path(sys.executable).parent / "mc-gguf")
    stats, plan = folder / "stats.safetensors", folder / "plan.json"
    types = ["--types", *args.types] if args.types else []
    calibrate = [mc, "calibrate", str(model), "--text", str(text), "--tokens", str(args.tokens), "--seq-len",
                 str(args.seq_len), "--hessian", "-q"]
    print(f"{n_layers} layer(s), calibrate and quantize --tune with and without --ray:", file=sys.stderr, flush=True)
    rows, files = {}, {}
    runs = [("calibrate", types, stats)]  # the statistics quantize reads
    if "calibrate" in args.ray_stages:
        runs += [("calibrate --ray", [*types, "--ray", address], folder / "ray.stats"),
                 ("calibrate forward", ["--types", "Q8_0"], folder / "forward.stats")]
    for name, extra, out in runs:
        rows[name] = measure(f"mc-gguf {name}", [*calibrate, *extra, "-o", str(out)], log)
        files[name] = out
    same = {}
    if "calibrate" in args.ray_stages:
        same["calibrate"] = len({hashlib.sha256(files[n].read_bytes()).hexdigest()
                                 for n in ("calibrate", "calibrate --ray")}) == 1
        for name in ("calibrate --ray", "calibrate forward"):
            files[name].unlink()
    if "quantize" in args.ray_stages:
        rows["allocate"] = measure("mc-gguf allocate", [
            mc, "allocate", str(stats), "--bits", str(args.bits), "--per-projection", "--alpha", "0", "--beta", "0",
            "--gamma", "2", "-o", str(plan)], log)
        quantize = [mc, "quantize", str(model), "--plan", str(plan), "--stats", str(stats), "--tune",
                    "--tune-iters", str(args.tune_iters), "-q"]
        for name, extra in (("quantize", []), ("quantize --ray", ["--ray", address])):
            files[name] = folder / f"{name.replace(' ', '').replace('-', '')}.gguf"
            rows[name] = measure(f"mc-gguf {name}", [*quantize, *extra, "-o", str(files[name])], log)
        same["quantize"] = len({hashlib.sha256(files[n].read_bytes()).hexdigest()
                                for n in ("quantize", "quantize --ray")}) == 1
        for name in ("quantize", "quantize --ray"):
            files[name].unlink()
    experts = n_layers * shapes["num_local_experts"]
    report = {"stages": rows, "same_file": same, "experts": experts}
    for stage in ("calibrate", "quantize"):
        if f"{stage} --ray" in rows:
            report[f"{stage}_ray_overhead"] = round(rows[f"{stage} --ray"]["seconds"] / rows[stage]["seconds"] - 1, 3)
    if "calibrate forward" in rows:
        forward = rows["calibrate forward"]["seconds"]
        report["forward_seconds_per_layer"] = round(forward / n_layers, 1)
        report["error_seconds_per_expert"] = round(max(0.0, rows["calibrate"]["seconds"] - forward) / experts, 1)
    if "quantize" in rows:
        report["quantize_seconds_per_expert"] = round(rows["quantize"]["seconds"] / experts, 1)
    return report


def speedup_model(serial_per_layer: float, expert_seconds: float, n_experts: int, machines: int) -> float:
    """compress on ``machines`` machines like this one against one: per layer, the driver's serial part (the
    calibration's forward), then the layer's experts (their errors, GPTQ and tuning) spread over the machines
    (the next layer's forward and quantize's lookahead keep them all busy)."""
    alone = serial_per_layer + n_experts * expert_seconds
    return round(alone / (serial_per_layer + n_experts * expert_seconds / machines), 2)


def defaults_report(runs: dict, n_full: int) -> dict:
    """Per added layer, compress against imatrix + quantize; its fixed costs as a share of an ``n_full``-layer run."""
    counts = sorted(runs)
    seconds = {n: {k: v["seconds"] for k, v in runs[n]["stages"].items()} for n in counts}
    if len(counts) > 1:
        a, b = counts[-2], counts[-1]
        per_layer = {k: (seconds[b][k] - seconds[a][k]) / (b - a) for k in seconds[b]}
    else:
        per_layer = {k: v / counts[-1] for k, v in seconds[counts[-1]].items()}
    fixed = max(0.0, seconds[counts[-1]]["mc compress"] - counts[-1] * per_layer["mc compress"])
    total = fixed + n_full * per_layer["mc compress"]
    report = {"seconds_per_added_layer": {k: round(v, 1) for k, v in per_layer.items()},
              "compress_fixed_seconds": round(fixed, 1),
              "compress_fixed_share_of_full_model": round(fixed / total, 3) if total else None,
              "hours_for_full_model": {"mc compress": round(total / 3600, 2)}}
    for llama_type in ("IQ2_XS", "IQ2_S"):
        llama = per_layer["llama-imatrix"] + per_layer[f"llama-quantize {llama_type}"]
        report[f"compress_over_imatrix+quantize_{llama_type}_per_added_layer"] = round(
            per_layer["mc compress"] / llama, 3) if llama > 0 else None
        report["hours_for_full_model"][f"llama-imatrix + llama-quantize {llama_type}"] = round(
            n_full * llama / 3600, 2)
    report["cpu_use"] = {k: runs[counts[-1]]["stages"][k]["cpu_use"] for k in runs[counts[-1]]["stages"]}
    report["peak_anon_gib_max"] = {k: max(runs[n]["stages"][k].get("peak_anon_gib", 0) for n in counts)
                                   for k in runs[counts[-1]]["stages"]}
    return report


def ratios(stages: dict) -> dict:
    s = {k: v["seconds"] for k, v in stages.items()}
    if "llama-quantize" not in s:  # --calibrate-only
        return {"calibrate_over_imatrix": round(s["mc calibrate"] / s["llama-imatrix"], 3)}
    mc = s["mc calibrate"] + s["mc allocate"] + s["mc quantize"]
    llama = s["llama-imatrix"] + s["llama-quantize"]
    return {"calibrate+allocate+quantize_over_imatrix+quantize": round(mc / llama, 3),
            "convert_over_convert_hf_to_gguf": round(s["mc convert"] / s["llama convert"], 3),
            "calibrate_over_imatrix": round(s["mc calibrate"] / s["llama-imatrix"], 3),
            "quantize_over_llama_quantize": round(s["mc quantize"] / s["llama-quantize"], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4], help="layer counts (default: 1 2 4)")
    parser.add_argument("--text", help="calibration text (default: mc-gguf's default text)")
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens (default: 4096)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default: 2048)")
    parser.add_argument("--bits", type=float, default=2.5, help="mc-gguf's budget (default: 2.5)")
    parser.add_argument("--types", nargs="+", metavar="TYPE",
                        help="mc-gguf's candidate types (default: all; a few fast ones make a memory-only run short)")
    parser.add_argument("--llama-type", default="IQ2_XS",
                        help="llama-quantize's type, the stock type nearest the budget (default: IQ2_XS)")
    parser.add_argument("--ctx", type=int, default=512, help="eval window (default: 512, 2 windows)")
    parser.add_argument("--calibrate-only", action="store_true",
                        help="time only `mc-gguf calibrate` against llama-imatrix (the F16 file made first; "
                        "calibrate's per-layer target)")
    parser.add_argument("--compress", action="store_true", help="also time `mc-gguf compress` (the three stages again)")
    parser.add_argument("--defaults", action="store_true",
                        help="time `mc-gguf compress --bits B` with its defaults (tuning, every type) against "
                        "llama-imatrix + llama-quantize IQ2_XS and IQ2_S instead of the stages")
    parser.add_argument("--resume-check", action="store_true",
                        help="also kill a calibration part-way, resume it and compare the statistics")
    parser.add_argument("--keep-models", action="store_true", help="keep the built checkpoints")
    parser.add_argument("--ray", action="store_true",
                        help="time calibrate and quantize --tune in one process and with --ray on a local Ray "
                        "cluster of --nodes nodes of one CPU each (in namespaces of its own: reachable from this "
                        "machine only), and model the speed-up of 4 and 16 machines from the measured times")
    parser.add_argument("--nodes", type=int, default=2, help="--ray: the local cluster's nodes (default: 2)")
    parser.add_argument("--experts", type=int, help="experts per layer (default: Mixtral's 8; fewer make a "
                        "--ray run shorter at the same expert shapes)")
    iters = TuneSettings().iters
    parser.add_argument("--tune-iters", type=int, default=iters,
                        help=f"--ray: quantize's --tune-iters (default: {iters}, compress's)")
    parser.add_argument("--ray-stages", nargs="+", choices=["calibrate", "quantize"],
                        default=["calibrate", "quantize"], help="--ray: the stages timed with and without Ray "
                        "(default: both; with both it also models the speed-up)")
    add_output_flags(parser, "build/bench-scale", "where the files go",
                     quick_help="the tiny model's shapes, 1 and 2 layers, two types at 4 bits: checks the script works")
    args = parser.parse_args()

    from mc_gguf.calibrate.text import read_text

    shapes = MIXTRAL_8X7B
    if args.quick:
        shapes, args.layers, args.tokens, args.seq_len, args.ctx = QUICK_SHAPES, [1, 2], 512, 128, 64
        args.types, args.bits, args.llama_type = ["Q3_K", "Q4_K"], 4.0, "Q4_K"
    if args.experts:
        shapes = {**shapes, "num_local_experts": args.experts, "num_experts_per_tok": min(2, args.experts)}
    if args.ray:
        in_own_namespaces()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    text = work / "calib.txt"
    full = read_text(args.text).text
    text.write_text(full, encoding="utf-8")
    eval_text = work / "eval.txt"
    eval_text.write_text(full[-200_000:], encoding="utf-8")
    started = time.perf_counter()
    if args.ray:
        address = start_ray_cluster(args.nodes)
        runs = {n: run_ray(n, shapes, args, work, text, address) for n in args.layers}
        largest = runs[max(args.layers)]
        report = {"shapes": shapes, "tokens": args.tokens, "bits": args.bits, "tune_iters": args.tune_iters,
                  "nodes": args.nodes, "cpus": os.cpu_count(), "runs": {str(n): run for n, run in runs.items()}}
        if "quantize_seconds_per_expert" in largest and "forward_seconds_per_layer" in largest:
            expert = largest["error_seconds_per_expert"] + largest["quantize_seconds_per_expert"]
            report["modelled_speedup"] = {str(m): speedup_model(largest["forward_seconds_per_layer"], expert,
                                                                MIXTRAL_8X7B["num_local_experts"], m) for m in (4, 16)}
        report["seconds"] = round(time.perf_counter() - started, 1)
        emit_json(report, args.json, indent=1)
        return 0
    if args.defaults:
        runs = {n: run_defaults(n, shapes, args, work, text) for n in args.layers}
        report = {"shapes": shapes, "tokens": args.tokens, "seq_len": args.seq_len, "bits": args.bits,
                  "cpus": os.cpu_count(), "runs": {str(n): run for n, run in runs.items()},
                  **defaults_report(runs, shapes["n_layers_full"]), "seconds": round(time.perf_counter() - started, 1)}
        emit_json(report, args.json, indent=1)
        return 0
    runs = {n: run_layers(n, shapes, args, work, text, eval_text) for n in args.layers}
    report = {"shapes": shapes, "tokens": args.tokens, "seq_len": args.seq_len, "bits": args.bits,
              "types": args.types or "all",
              "llama_type": args.llama_type, "cpus": os.cpu_count(),
              "runs": {str(n): {**run, "ratios": ratios(run["stages"])} for n, run in runs.items()}}
    largest = max(args.layers)
    per_layer = {}
    if len(args.layers) > 1:
        second = sorted(args.layers)[-2]
        a, b = runs[second]["stages"], runs[largest]["stages"]
        report["memory_flatness"] = {k: round(b[k]["peak_rss_gib"] / a[k]["peak_rss_gib"], 3) for k in a}
        if all("peak_anon_gib" in row for row in (*a.values(), *b.values())):
            report["anonymous_memory_flatness"] = {k: round(b[k]["peak_anon_gib"] / a[k]["peak_anon_gib"], 3)
                                                   for k in a}
        per_layer = {k: (b[k]["seconds"] - a[k]["seconds"]) / (largest - second) for k in a}
    else:
        per_layer = {k: v["seconds"] / largest for k, v in runs[largest]["stages"].items()}
    report["seconds_per_layer"] = {k: round(v, 1) for k, v in per_layer.items()}
    if "llama-imatrix" in per_layer:  # None where imatrix's added layer is lost in the noise (tiny shapes)
        report["calibrate_over_imatrix_per_layer"] = (round(per_layer["mc calibrate"] / per_layer["llama-imatrix"], 3)
                                                      if per_layer["llama-imatrix"] > 0 else None)
    report["hours_for_32_layers"] = {k: round(v * shapes["n_layers_full"] / 3600, 2) for k, v in per_layer.items()}
    report["peak_rss_gib_max"] = {k: max(r["stages"][k]["peak_rss_gib"] for r in runs.values())
                                  for k in runs[largest]["stages"]}
    if all("peak_anon_gib" in row for r in runs.values() for row in r["stages"].values()):
        report["peak_anon_gib_max"] = {k: max(r["stages"][k]["peak_anon_gib"] for r in runs.values())
                                       for k in runs[largest]["stages"]}
    report["seconds"] = round(time.perf_counter() - started, 1)
    emit_json(report, args.json, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
