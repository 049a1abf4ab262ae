"""Per-layer ODP thresholds (and the experts' mean outputs, means.py): from calibration statistics, or measured on
a text and written into a GGUF."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from mc_gguf.atomic import check_output_path, output_lock
from mc_gguf.calibrate.calibration import calibrate
from mc_gguf.calibrate.settings import CalibrationSettings
from mc_gguf.calibrate.stats import CalibrationStats
from mc_gguf.calibrate.text import CalibrationText
from mc_gguf.errors import GGUFFileError, McGgufError
from mc_gguf.gguf_io.edit import rewrite_metadata, rewrite_tensors
from mc_gguf.gguf_io import keys
from mc_gguf.gguf_io.header import scan
from mc_gguf.gguf_io.requirements import ODP_MEAN_TENSOR, requirements
from mc_gguf.gguf_io.write import OutputTensor
from mc_gguf.gguf_io.validate import check_model
from mc_gguf.prune import rule as pruning
from mc_gguf.prune.budget import thresholds_by_sensitivity, thresholds_per_expert
from mc_gguf.prune.means import carries_means, mean_tensors
from mc_gguf.prune.settings import DEFAULT_RENORMALIZE, DEFAULT_RULE, THRESHOLD_RULES


def router_statistics(model_dir: str | Path, text: CalibrationText, work: Path, *, n_tokens: int = 8192,
                      seq_len: int = 512, seed: int = 0, progress: bool = True) -> CalibrationStats:
    """Routing statistics (w_i / w_0 and skip costs of every calibration token in every layer).

    Measured by the calibration's own pass (calibrate/), one decoder layer in
    memory at a time, without the quantization errors of any tensor; its statistics go to
    ``work`` (an interrupted run resumes there).
    """
    settings = CalibrationSettings(n_tokens=n_tokens, seq_len=seq_len, seed=seed, types=(), tensor_types=())
    return calibrate(model_dir, work / "router.stats", text, settings, progress=progress, reuse=True)


def check_rule(rule: str) -> None:
    if rule not in THRESHOLD_RULES:
        raise McGgufError(f"unknown threshold rule {rule!r}; choose one of {', '.join(THRESHOLD_RULES)}")


def odp_from_stats(stats: CalibrationStats, skip_share: float,
                   protect_ratio: float = pruning.DEFAULT_PROTECT_RATIO, rule: str = DEFAULT_RULE,
                   renormalize: bool = DEFAULT_RENORMALIZE) -> pruning.OdpParams:
    """Thresholds (per layer, or per layer and expert) that skip about ``skip_share`` of the expert slots on the
    calibration tokens, chosen by ``rule`` (settings.py) with the costs of the pruning ``renormalize`` says;
    dense layers get 0 (pruning off)."""
    check_rule(rule)
    n_used = int(stats.info["n_expert_used"])
    bids, layers = zip(*stats.moe_layers)
    ratios = [layer.top_ratio for layer in layers]
    costs = [layer.skip_cost if renormalize else layer.drop_cost for layer in layers]
    if rule != "quantile" and any(cost is None for cost in costs):
        raise McGgufError("these statistics have no skip costs for this pruning (an older mc-gguf measured them): "
                          "calibrate again, or choose the quantile rule")
    if rule == "sensitivity" and any(layer.slot_experts is None for layer in layers):
        raise McGgufError("these statistics do not say which expert each slot had (an older mc-gguf measured "
                          "them): calibrate again, or choose --rule sensitivity-layer")
    if rule == "sensitivity":
        per_expert = thresholds_per_expert(ratios, costs, [layer.slot_experts for layer in layers], stats.n_experts,
                                           skip_share, n_used)
        every = dict(zip(bids, per_expert))
        return pruning.OdpParams.per_expert([every.get(bid, [0.0] * stats.n_experts) for bid in range(len(stats.layers))],
                                            protect_ratio, renormalize)
    if rule == "quantile":
        mu = pruning.thresholds_for_skip_share(ratios, skip_share, n_used)
    else:
        mu = thresholds_by_sensitivity(ratios, costs, skip_share, n_used)
    every = dict(zip(bids, mu))
    return pruning.OdpParams([every.get(bid, 0.0) for bid in range(len(stats.layers))], protect_ratio,
                             renormalize=renormalize)


def skipped_shares(stats: CalibrationStats, odp: pruning.OdpParams) -> list[float | None]:
    """The share of each layer's expert slots ``odp`` skips on the calibration tokens (None: a dense layer)."""
    shares: list[float | None] = []
    for il, layer in enumerate(stats.layers):
        if layer is None:
            shares.append(None)
            continue
        ratios = layer.top_ratio.reshape(len(layer.top_ratio), -1)
        mu = odp.slot_thresholds(il, layer.slot_experts.reshape(ratios.shape)) if odp.mu_exps else odp.mu[il]
        shares.append(float((ratios < mu).sum()) / (ratios.shape[0] * (ratios.shape[1] + 1)))
    return shares


def write_odp_metadata(gguf_in: str | Path, gguf_out: str | Path, odp: pruning.OdpParams,
                       means: Sequence[OutputTensor] = ()) -> Path:
    """Set the mc.odp.* keys of ``odp``, and the runtime patch level they need; the file's mean outputs become
    ``means`` (means.mean_tensors) where it may carry them (means.carries_means), else none. Other tensors are
    copied unchanged."""
    header = scan(gguf_in)
    arch = header.architecture or ""
    names = [t.name for t in header.tensors if not ODP_MEAN_TENSOR.search(t.name)]
    means = list(means) if carries_means(arch, names) else []
    updates = pruning.odp_metadata(odp)
    # per-layer thresholds over a file that had per-expert ones: the runtime would still read the old ones
    remove = [keys.ODP_MU_EXPS] if odp.mu_exps is None and keys.ODP_MU_EXPS in header.fields else []
    fields = {k: v for k, v in header.fields.items() if k not in remove}
    needs = requirements(arch, names + [t.name for t in means], {**fields, **updates})
    updates[keys.RUNTIME_PATCH_LEVEL] = keys.details(keys.RUNTIME_PATCH_LEVEL, needs.patch_level)
    if means or len(names) != len(header.tensors):
        return rewrite_tensors(gguf_in, gguf_out, updates, remove=remove, drop=ODP_MEAN_TENSOR.search, add=means)
    return rewrite_metadata(gguf_in, gguf_out, updates, remove)


def calibrate_odp(model_dir: str | Path, text: CalibrationText, gguf_in: str | Path, gguf_out: str | Path, skip_share: float, *,
                  n_tokens: int = 8192, seq_len: int = 512,
                  protect_ratio: float = pruning.DEFAULT_PROTECT_RATIO, rule: str = DEFAULT_RULE,
                  renormalize: bool = DEFAULT_RENORMALIZE,
                  progress: bool = True) -> tuple[pruning.OdpParams, list[float | None]]:
    """Thresholds for ``skip_share`` of the slots on ``text`` (chosen by ``rule``), written into ``gguf_out``.

    Returns the thresholds and the share of each layer's slots they skip on the calibration tokens (None for
    a dense layer, whose threshold is 0). The
    router statistics are kept in a folder beside ``gguf_out`` until the file
    is written, so that an interrupted run resumes.
    """
    check_rule(rule)  # before the model pass
    _check_inputs(model_dir, gguf_in, gguf_out, skip_share, protect_ratio)
    gguf_out = Path(gguf_out)
    with output_lock(gguf_out):  # a second run on this output is refused instead of removing this one's work
        work = gguf_out.parent / f".{gguf_out.name}.odp-calibrate"
        work.mkdir(exist_ok=True)
        stats = router_statistics(model_dir, text, work, n_tokens=n_tokens, seq_len=seq_len, progress=progress)
        odp = odp_from_stats(stats, skip_share, protect_ratio, rule, renormalize)
        write_odp_metadata(gguf_in, gguf_out, odp, mean_tensors(stats, odp))
        shutil.rmtree(work, ignore_errors=True)
    return odp, skipped_shares(stats, odp)


def _check_inputs(model_dir: str | Path, gguf_in: str | Path, gguf_out: str | Path, skip_share: float,
                  protect_ratio: float) -> int:
    """Everything that can be wrong, checked before the model pass; returns the experts per token."""
    from mc_gguf.hf.checkpoint import open_checkpoint

    ckpt = open_checkpoint(model_dir)
    pruning.check_skip_share(skip_share, ckpt.n_experts_used)
    pruning.validate_params([], protect_ratio)
    check_output_path(gguf_out, inputs=[model_dir])
    header = check_model(gguf_in)
    arch = header.architecture
    hidden, _ = ckpt.expert_dims
    # the thresholds are per layer and expert of the model the router statistics come from: a GGUF of another
    # model would take them and no longer load (or prune the wrong experts)
    for what, in_file, in_model in (("layers", header.get(f"{arch}.block_count"), ckpt.n_layers),
                                    ("experts", header.get(f"{arch}.expert_count"), ckpt.n_experts),
                                    ("experts per token", _used_max(header.get(f"{arch}.expert_used_count")),
                                     ckpt.n_experts_used),
                                    ("hidden size", header.get(f"{arch}.embedding_length"), hidden)):
        if in_file != in_model:
            raise GGUFFileError(f"{gguf_in} has {in_file} {what}, the model in {model_dir} {in_model}: "
                                "is it a GGUF of this model?")
    return ckpt.n_experts_used


def _used_max(value) -> int | None:
    """expert_used_count: one number, or one per layer (the largest)."""
    return int(max(value)) if hasattr(value, "__len__") and len(value) else value

