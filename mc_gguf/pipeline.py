"""compress = the stages in order: calibrate -> allocate -> quantize (and write), pruning thresholds included.

Each stage leaves its artifact (statistics, plan, GGUF); ``keep_artifacts``
keeps the first two for inspection or for re-running a stage alone.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from mc_gguf.allocate.allocation import allocate, projection_bits
from mc_gguf.allocate.plan import Plan
from mc_gguf.allocate.program import check_budget
from mc_gguf.atomic import atomic_output, check_output_path, output_lock
from mc_gguf.calibrate.calibration import calibrate
from mc_gguf.calibrate.settings import CalibrationSettings
from mc_gguf.calibrate.stats import CalibrationStats
from mc_gguf.calibrate.text import CalibrationText
from mc_gguf.device import torch_device
from mc_gguf.ggml.types import quant_type
from mc_gguf.hf.checkpoint import open_checkpoint
from mc_gguf.prune.calibration import odp_from_stats, skipped_shares
from mc_gguf.prune.rule import OdpParams, check_skip_share
from mc_gguf.prune.settings import DEFAULT_RENORMALIZE, DEFAULT_RULE
from mc_gguf.quantize.quantization import quantize
from mc_gguf.quantize.tune import TuneSettings
from mc_gguf.quantize.tuned_errors import tuned_error_ratios


@dataclass
class CompressResult:
    path: Path
    plan: Plan
    stats: CalibrationStats
    odp: OdpParams | None


def compress(model_dir: str | Path, out: str | Path, bits: float, text: CalibrationText, *,
             settings: CalibrationSettings = CalibrationSettings(), layout: str = "per-expert",
             odp_skip: float | None = None, odp_rule: str = DEFAULT_RULE,
             odp_renormalize: bool = DEFAULT_RENORMALIZE, gptq: bool = False,
             tune: TuneSettings | None = None, keep_artifacts: str | Path | None = None,
             allocate_options: dict | None = None, progress: bool = True) -> CompressResult:
    """Calibrate, allocate and quantize ``model_dir`` into ``out``.

    ``tune`` quantizes with GPTQ and tuned K-quant integers and i-quant scales
    (quantize/tune.py); the allocation then sees those types' errors scaled by how much tuning
    lowered them on a sample of experts (tuned_error_ratios).

    The statistics and the plan are kept in a work folder beside the output
    (``.OUT.mc-gguf``, or ``keep_artifacts``) until the GGUF is written: an
    interrupted run, started again with the same inputs, resumes there (the
    calibration at its first unfinished layer). The folder is removed when
    the file is written, unless it is ``keep_artifacts``.
    """
    out = check_output_path(out, inputs=[model_dir])
    with output_lock(out):  # a second run on this output is refused instead of removing this one's work
        # impossible requests fail now, not after calibration
        torch_device(settings.device)
        if tune is not None:
            torch_device(tune.device)
        ckpt = open_checkpoint(model_dir)
        types = [quant_type(t).name for t in (allocate_options or {}).get("types") or settings.types]
        check_budget(bits, projection_bits(ckpt, types))
        settings = replace(settings, types=tuple(types))  # errors are measured only for types the plan may use
        if odp_skip:
            check_skip_share(odp_skip, ckpt.n_experts_used)
        gptq = gptq or tune is not None
        if gptq and not settings.hessian:
            settings = replace(settings, hessian=True)
        work = Path(keep_artifacts) if keep_artifacts else work_folder(out)
        if work.is_dir() and any(work.iterdir()) and progress:
            print(f"resuming the work in {work}", flush=True)
        work.mkdir(parents=True, exist_ok=True)
        stats_path = work / "stats.safetensors"
        stats = calibrate(model_dir, stats_path, text, settings, progress=progress, reuse=True)
        error_scale = _tuned_errors(model_dir, stats, work, tune, progress) if tune is not None else None
        plan = allocate(stats, bits, model_dir=model_dir, layout=layout, stats_path=str(stats_path),
                        error_scale=error_scale, **(allocate_options or {}))
        plan.save(work / "plan.json")
        odp = odp_from_stats(stats, odp_skip, rule=odp_rule, renormalize=odp_renormalize) if odp_skip else None
        path = quantize(model_dir, plan, out, stats=stats, gptq=gptq, tune=tune, odp=odp, progress=progress)
        if not keep_artifacts:
            shutil.rmtree(work, ignore_errors=True)
        return CompressResult(path, plan, stats, odp)


def _tuned_errors(model_dir, stats: CalibrationStats, work: Path, tune: TuneSettings,
                  progress: bool) -> dict[str, float]:
    """tuned_error_ratios, kept in the work folder so that a resumed run does not measure them again."""
    path = work / "tuned_errors.json"
    key = {"types": list(stats.types), "iters": tune.iters, "min_gain": tune.min_gain,
           "text_sha256": stats.info.get("text_sha256")}
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["ratios"]
    ratios = tuned_error_ratios(model_dir, stats, list(stats.types), settings=tune, progress=progress)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps({"key": key, "ratios": ratios}, indent=1) + "\n")
    return ratios


def work_folder(out: Path) -> Path:
    """Where compress keeps its statistics and plan until ``out`` is written."""
    return out.parent / f".{out.name}.mc-gguf"


def summary(result: CompressResult) -> str:
    p = result.plan.predicted
    lines = [f"{result.path}: {p['file_bytes'] / 1e6:.2f} MB, layout {result.plan.layout}",
             f"  experts {p['expert_bpw']:.3f} bits per weight, all tensors {p['model_bpw']:.3f}",
             f"  {'layer':>5} {'bpw':>6} {'mu':>6} {'skips':>6}"]
    skipped = []  # share of the layer's slots the thresholds skip on the calibration tokens
    shares = skipped_shares(result.stats, result.odp) if result.odp is not None else []
    for bid, layer_bits in enumerate(p["layer_expert_bpw"]):
        if layer_bits is None:
            lines.append(f"  {bid:>5} {'dense':>6} {'-':>6} {'-':>6}")
            continue
        if result.odp is None:
            lines.append(f"  {bid:>5} {layer_bits:6.2f} {'-':>6} {'-':>6}")
            continue
        skipped.append(shares[bid])
        lines.append(f"  {bid:>5} {layer_bits:6.2f} {result.odp.mu[bid]:6.3f} {skipped[-1]:6.1%}")
    if skipped:
        lines.append(f"  expected share of expert slots skipped: {sum(skipped) / len(skipped):.1%}")
    if result.odp is not None and result.odp.mu_exps is not None:
        lines.append("  (thresholds per expert: mu is the layer's smallest positive one)")
    return "\n".join(lines)
