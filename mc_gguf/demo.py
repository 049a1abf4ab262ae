"""The embedded default job: a tiny seeded Mixtral, built, converted and run, offline."""

from __future__ import annotations

import time
from pathlib import Path

from mc_gguf.convert import convert
from mc_gguf.run import load
from mc_gguf.runtime.status import require_patched_runtime
from mc_gguf.tiny import TinyMixtralSpec, build_tiny_mixtral

PROMPT = "The quick brown fox"


def run_demo(workdir: Path) -> None:
    status = require_patched_runtime()
    print(f"runtime: llama_cpp {status.version}, mc-gguf patch level {status.patch_level}")
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = workdir / "tiny-mixtral"
    spec = TinyMixtralSpec()
    if not (model_dir / "config.json").exists():
        started = time.perf_counter()
        build_tiny_mixtral(model_dir, spec)
        print(f"built a seeded random Mixtral ({spec.num_hidden_layers} layers, {spec.num_local_experts} experts, "
              f"top-{spec.num_experts_per_tok}, hidden {spec.hidden_size}) in {model_dir} "
              f"({time.perf_counter() - started:.1f} s)")
    else:
        print(f"using the tiny Mixtral in {model_dir}")
    for out_type in ("f16", "q8_0"):
        out = workdir / f"tiny-mixtral-{out_type}.gguf"
        started = time.perf_counter()
        convert(model_dir, out, out_type, progress=False)
        print(f"converted to {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s")
        llm = load(out, n_ctx=256)
        text = llm.create_completion(PROMPT, max_tokens=16, temperature=0.0)["choices"][0]["text"]
        print(f"  llama.cpp greedy continuation of {PROMPT!r} ({out_type}, random weights): {text!r}")
