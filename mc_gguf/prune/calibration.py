"""Per-layer ODP thresholds: from calibration statistics, or measured on a text and written into a GGUF."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from mc_gguf.atomic import check_output_path
from mc_gguf.calibrate.calibration import calibrate
from mc_gguf.calibrate.settings import CalibrationSettings
from mc_gguf.calibrate.stats import CalibrationStats
from mc_gguf.calibrate.text import CalibrationText
from mc_gguf.errors import GGUFFileError, McGgufError
from mc_gguf.gguf_io import keys
from mc_gguf.gguf_io.edit import field_value, float_array, float_value, open_gguf, rewrite_metadata
from mc_gguf.prune import rule as pruning
from mc_gguf.prune.budget import thresholds_by_sensitivity
from mc_gguf.prune.settings import DEFAULT_RULE, THRESHOLD_RULES


def router_statistics(model_dir: str | Path, text: CalibrationText, work: Path, *, n_tokens: int = 8192,
                      seq_len: int = 512, seed: int = 0, progress: bool = True) -> CalibrationStats:
    """Routing statistics (w_i / w_0 and skip costs of every calibration token in every layer).

    Measured by the calibration's own pass (calibrate/), one decoder layer in
    memory at a time, without the quantization errors; its statistics go to
    ``work`` (an interrupted run resumes there).
    """
    settings = CalibrationSettings(n_tokens=n_tokens, seq_len=seq_len, seed=seed, types=())
    return calibrate(model_dir, work / "router.stats", text, settings, progress=progress, reuse=True)


def check_rule(rule: str) -> None:
    if rule not in THRESHOLD_RULES:
        raise McGgufError(f"unknown threshold rule {rule!r}; choose one of {', '.join(THRESHOLD_RULES)}")


def thresholds(stats: CalibrationStats, skip_share: float, rule: str = DEFAULT_RULE) -> list[float]:
    """Per-layer mu that skip about ``skip_share`` of the expert slots on the calibration tokens."""
    check_rule(rule)
    n_used = int(stats.info["n_expert_used"])
    bids, layers = zip(*stats.moe_layers)
    if rule == "quantile":
        mu = pruning.thresholds_for_skip_share([layer.top_ratio for layer in layers], skip_share, n_used)
    elif any(layer.skip_cost is None for layer in layers):
        raise McGgufError("these statistics have no skip costs (an older mc-gguf measured them): calibrate again, "
                          "or choose the quantile rule")
    else:
        mu = thresholds_by_sensitivity([layer.top_ratio for layer in layers],
                                       [layer.skip_cost for layer in layers], skip_share, n_used)
    every = [0.0] * len(stats.layers)  # dense layers: no slots, pruning off
    for bid, m in zip(bids, mu):
        every[bid] = m
    return every


def write_odp_metadata(gguf_in: str | Path, gguf_out: str | Path, mu: list[float],
                       protect_ratio: float = pruning.DEFAULT_PROTECT_RATIO) -> Path:
    """Set mc.odp.mu and mc.odp.protect_ratio (tensors are copied unchanged)."""
    pruning.validate_params(mu, protect_ratio)
    return rewrite_metadata(gguf_in, gguf_out, {
        keys.ODP_MU: float_array(mu),
        keys.ODP_PROTECT_RATIO: float_value(protect_ratio),
    })


def calibrate_odp(model_dir: str | Path, text: CalibrationText, gguf_in: str | Path, gguf_out: str | Path, skip_share: float, *,
                  n_tokens: int = 8192, seq_len: int = 512,
                  protect_ratio: float = pruning.DEFAULT_PROTECT_RATIO, rule: str = DEFAULT_RULE,
                  progress: bool = True) -> tuple[list[float], list[np.ndarray]]:
    """Per-layer mu for ``skip_share`` of the slots on ``text`` (chosen by ``rule``), written into ``gguf_out``.

    Returns the thresholds and the per-layer ratios w_i / w_0 [tokens, k-1] they came from (None for a
    dense layer, whose threshold is 0). The
    router statistics are kept in a folder beside ``gguf_out`` until the file
    is written, so that an interrupted run resumes.
    """
    check_rule(rule)  # before the model pass
    _check_inputs(model_dir, gguf_in, gguf_out, skip_share, protect_ratio)
    gguf_out = Path(gguf_out)
    work = gguf_out.parent / f".{gguf_out.name}.odp-calibrate"
    work.mkdir(exist_ok=True)
    stats = router_statistics(model_dir, text, work, n_tokens=n_tokens, seq_len=seq_len, progress=progress)
    mu = thresholds(stats, skip_share, rule)
    write_odp_metadata(gguf_in, gguf_out, mu, protect_ratio)
    shutil.rmtree(work, ignore_errors=True)
    return mu, [layer.top_ratio if layer is not None else None for layer in stats.layers]


def _check_inputs(model_dir: str | Path, gguf_in: str | Path, gguf_out: str | Path, skip_share: float,
                  protect_ratio: float) -> int:
    """Everything that can be wrong, checked before the model pass; returns the experts per token."""
    from mc_gguf.hf.checkpoint import open_checkpoint

    ckpt = open_checkpoint(model_dir)
    pruning.check_skip_share(skip_share, ckpt.n_experts_used)
    pruning.validate_params([], protect_ratio)
    check_output_path(gguf_out)
    reader = open_gguf(gguf_in)
    arch = field_value(reader, "general.architecture")
    n_layers = field_value(reader, f"{arch}.block_count")
    if n_layers != ckpt.n_layers:
        raise GGUFFileError(f"{gguf_in} has {n_layers} layers, the model in {model_dir} {ckpt.n_layers}: "
                            "is it a GGUF of this model?")
    return ckpt.n_experts_used


def odp_from_stats(stats: CalibrationStats, skip_share: float,
                   protect_ratio: float = pruning.DEFAULT_PROTECT_RATIO, rule: str = DEFAULT_RULE) -> pruning.OdpParams:
    """Per-layer mu that skip ``skip_share`` of the expert slots on the calibration tokens."""
    return pruning.OdpParams(thresholds(stats, skip_share, rule), protect_ratio)
