"""compress = the stages in order: calibrate -> allocate -> quantize (and write), pruning thresholds included.

Each stage leaves its artifact (statistics, plan, GGUF); ``keep_artifacts``
keeps the first two for inspection or for re-running a stage alone.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from mc_gguf.allocate.allocation import allocate, check_size, projection_bits, smallest_tensor_types
from mc_gguf.allocate.plan import Plan
from mc_gguf.allocate.program import check_budget
from mc_gguf.atomic import check_output_path, output_lock, work_folder
from mc_gguf.gguf_io.requirements import runs_in
from mc_gguf.calibrate.calibration import calibrate
from mc_gguf.calibrate.stats import CalibrationStats
from mc_gguf.calibrate.text import CalibrationText, read_text
from mc_gguf.device import torch_device
from mc_gguf.errors import McGgufError
from mc_gguf.ggml.types import quant_type
from mc_gguf.hf.checkpoint import open_checkpoint
from mc_gguf.prune.calibration import odp_from_stats, skipped_shares
from mc_gguf.prune.means import means_bytes
from mc_gguf.prune.rule import OdpParams, check_skip_share
from mc_gguf.ray_cluster import check_device, connect
from mc_gguf.quantize.quantization import quantize
from mc_gguf.quantize.settings import TuneSettings
from mc_gguf.settings import CompressSettings
from mc_gguf.quantize.tuned_errors import TunedErrors, load_tuned_errors, measured_tuned_errors


@dataclass
class CompressResult:
    path: Path
    plan: Plan
    stats: CalibrationStats
    odp: OdpParams | None


def compress(model_dir: str | Path, out: str | Path, bits: float | None = None,
             text: CalibrationText | str | Path | None = None, *, settings: CompressSettings | None = None,
             keep_artifacts: str | Path | None = None, progress: bool = True) -> CompressResult:
    """Calibrate, allocate and quantize ``model_dir`` (a folder or a Hugging Face id) into ``out``, with the
    settings `mc-gguf compress` has by default (settings.py: tuned, a type per projection, compress's cost).

    ``bits`` sets ``settings.bits``; ``text`` is the calibration text (a CalibrationText, a file, or None for
    the built-in default). With ``settings.tune`` the quantizer runs GPTQ and tunes the K-quant integers and
    i-quant scales (quantize/tune.py), and the allocation sees those types' errors scaled by how much tuning
    lowered them on a sample of experts (tuned_error_ratios).

    The statistics and the plan are kept in a work folder beside the output
    (``.OUT.mc-gguf``, or ``keep_artifacts``) until the GGUF is written: an
    interrupted run, started again with the same inputs, resumes there (the
    calibration at its first unfinished layer). The folder is removed when
    the file is written, unless it is ``keep_artifacts``.
    """
    settings = settings or CompressSettings()
    if bits is not None and settings.size is not None:
        raise McGgufError("give the budget as bits or as settings.size, one of the two")
    if bits is not None:
        settings = replace(settings, bits=bits)
    out = check_output_path(out, inputs=[model_dir])
    with output_lock(out):  # a second run on this output is refused instead of removing this one's work
        # impossible requests fail now, not after calibration
        if settings.ray is not None:  # its tasks run on the cluster's CPUs
            check_device(settings.calibration.device)
            if settings.tune is not None:
                check_device(settings.tune.device)
        torch_device(settings.calibration.device)
        if settings.tune is not None:
            torch_device(settings.tune.device)
        if settings.ray is not None:
            connect(settings.ray)
        ckpt = open_checkpoint(model_dir)
        types = [quant_type(t).name for t in settings.allocation.types or settings.calibration.types]
        # pruning's mean outputs (prune/means.py) come beside the plan's tensors in a per-expert file
        with_means = settings.odp.skip and not settings.odp.renormalize and settings.allocation.layout == "per-expert"
        size = settings.size
        if size is not None and with_means:
            size -= means_bytes(ckpt)
        if size is None:
            check_budget(settings.bits, projection_bits(ckpt, types))
        else:
            check_size(ckpt, size, settings.allocation.layout, types, settings.allocation.non_expert,
                       settings.allocation.options(tuned=settings.tune is not None)["per_projection"],
                       tensors=smallest_tensor_types(ckpt, set(settings.allocation.non_expert),
                                                     list(settings.calibration.tensor_types)))
        settings = replace(settings, allocation=replace(settings.allocation, types=tuple(types))).resolved()
        odp = settings.odp
        if odp.skip:
            check_skip_share(odp.skip, ckpt.n_experts_used)
        if not isinstance(text, CalibrationText):
            text = read_text(text)
        work = Path(keep_artifacts) if keep_artifacts else work_folder(out)
        if work.is_dir() and any(work.iterdir()) and progress:
            print(f"resuming the work in {work}", flush=True)
        work.mkdir(parents=True, exist_ok=True)
        stats_path = work / "stats.safetensors"
        stats = calibrate(ckpt.path, stats_path, text, settings.calibration, progress=progress, reuse=True,
                          ray=settings.ray)
        if with_means and any(layer is not None and layer.skip_mean is None for layer in stats.layers):
            print(f"mc-gguf: the statistics in {work} predate pruning's mean outputs (an earlier mc-gguf made "
                  f"them): this file prunes without them; remove {work} to measure them", file=sys.stderr)
        tune = settings.tune
        error_scale = (_tuned_errors(ckpt.path, stats, work, tune, settings.ray, progress) if tune is not None
                       else None)
        bits = settings.bits if settings.size is None else None
        plan = allocate(stats, bits, size=size, model_dir=ckpt.path, stats_path=str(stats_path),
                        error_scale=error_scale, **settings.allocation.options())
        plan.save(work / "plan.json")
        thresholds = (odp_from_stats(stats, odp.skip, rule=odp.rule, renormalize=odp.renormalize)
                      if odp.skip else None)
        path = quantize(ckpt.path, plan, out, stats=stats, gptq=settings.uses_gptq, tune=tune, odp=thresholds,
                        ray=settings.ray, work=work, progress=progress)
        if not keep_artifacts:
            shutil.rmtree(work, ignore_errors=True)
        return CompressResult(path, plan, stats, thresholds)


def _tuned_errors(model_dir, stats: CalibrationStats, work: Path, tune: TuneSettings, ray: str | None,
                  progress: bool) -> dict[str, float]:
    """The tuned-error ratios, kept in the work folder so that a resumed run does not measure them again."""
    path = work / "tuned_errors.json"
    if path.exists():
        try:
            saved = load_tuned_errors(path)
        except McGgufError:
            saved = None
        if saved is not None and saved.key == TunedErrors.key_of(stats, tune):
            return saved.ratios
    measured = measured_tuned_errors(model_dir, stats, tune, ray=ray, progress=progress)
    measured.save(path)
    return measured.ratios


def summary(result: CompressResult) -> str:
    p = result.plan.predicted
    lines = [f"{result.path}: {p['file_bytes'] / 1e6:.2f} MB, layout {result.plan.layout}", f"  {runs_in(result.path)}",
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
