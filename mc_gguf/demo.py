"""The embedded default job: a tiny seeded Mixtral, built, converted, given pruning thresholds and run, offline."""

from __future__ import annotations

import time
from pathlib import Path

from mc_gguf.calibrate.text import CalibrationText
from mc_gguf.loader.model import load
from mc_gguf.gguf_io.convert import convert
from mc_gguf.hf.tiny import TinyMixtralSpec, build_tiny_mixtral
from mc_gguf.prune.calibration import calibrate_odp
from mc_gguf.runtime.status import require_patched_runtime

PROMPT = "The quick brown fox"

# A little calibration text for the demo's pruning thresholds (the real job uses a file).
CALIBRATION_TEXT = CalibrationText("the demo's paragraph", (
    "Mixture-of-Experts language models route every token to a few of many feed-forward experts. "
    "A router scores the experts, the best two are run, and their outputs are mixed by the router's "
    "weights. When the second expert's weight is small next to the first, running it changes little, "
    "so it can be skipped: that is online dynamic pruning. Experts that are rarely chosen, or chosen "
    "with small weights, can also be stored with fewer bits than the ones the model relies on. "
    "Together the two ideas let a large model run on a laptop with most of its quality."
))


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

    out = workdir / "tiny-mixtral-q8_0.gguf"
    started = time.perf_counter()
    convert(model_dir, out, "q8_0", progress=False)
    print(f"converted to {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s")

    pruned = workdir / "tiny-mixtral-q8_0-odp.gguf"
    _, shares = calibrate_odp(model_dir, CALIBRATION_TEXT, out, pruned, 0.25, n_tokens=64, seq_len=64,
                              progress=False)
    print(f"pruning thresholds for a 25% skip share (per layer and expert), each layer's share of the calibration "
          f"slots: {', '.join(f'{s:.0%}' for s in shares if s is not None)} -> {pruned}")

    for path, label in ((out, "no pruning"), (pruned, "online dynamic pruning")):
        llm = load(path, n_ctx=256)
        text = llm.create_completion(PROMPT, max_tokens=16, temperature=0.0)["choices"][0]["text"]
        stats = llm.expert_stats()
        print(f"  {label}: {PROMPT!r} -> {text!r}")
        print(f"    expert slots computed {sum(stats.computed)}, skipped {sum(stats.skipped)} "
              f"({100 * stats.skipped_share:.1f}%)  [random weights: the text is noise]")
