"""How much tuning lowers each type's error: the ratios allocate scales the calibration's errors by.

The calibration measured every type's error with ggml's quantizer alone; tuning (tune.py) lowers the
K-quants' errors several times, the i-quants' less. The i-quants are measured with their scales tuned alone
(``TuneSettings.lattice`` off) even where quantize moves the grid points of IQ1_S, IQ2_XXS and IQ2_XS too
(--tune-lattice), which lowers their errors further: priced at that, the program handed their bytes to the
output head and attention in whole files, and the bench model's file at IQ2_S's size came out 1.5x worse
(README, "Whole files at a size"). ``tuned_error_ratios`` draws
``sample`` experts (seeded) across the layers and ``rows`` rows of each of their projections (a row's loss
depends on that row alone, so a sample of rows estimates the matrix's ratio at a fraction of the cost: 128 of
Mixtral 8x7B's 14336), quantizes them both ways to every tunable type and sums the loss on the projection's
Hessian: the ratio tuned / untuned per type. Each (expert, input) Hessian is built and factored once and
shared by every type and by gate and up (gptq.Hessian): at Mixtral's shapes the down projection's factor
(14336 inputs) costs as much as tuning its 128 rows to every type.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mc_gguf.artifact import load_json, save_json
from mc_gguf.calibrate.stats import CalibrationStats
from mc_gguf.errors import McGgufError
from mc_gguf.ggml import quants
from mc_gguf.ggml.types import quant_type
from mc_gguf.gguf_io.layout import PROJECTIONS
from mc_gguf.hf.checkpoint import open_checkpoint
from mc_gguf.quantize.gptq import Hessian
from mc_gguf.quantize.hessian import ExpertHessians
from mc_gguf.quantize.tune import TuneSettings, tunable, tune_quantize

FORMAT = "mc-gguf tuned errors 1"


class TunedErrorsFileError(McGgufError):
    """A tuned-errors file that is not one save_tuned_errors wrote, or not for these statistics."""


@dataclass(frozen=True)
class TunedErrors:
    """The artifact: tuned_error_ratios' ratios, and what they were measured for (the statistics' text and
    types, the tuning's sweeps and stopping gain), so that a file measured for other settings is not used."""

    ratios: dict[str, float]
    key: dict

    @staticmethod
    def key_of(stats: CalibrationStats, settings: TuneSettings) -> dict:
        return {"types": list(stats.types), "iters": settings.iters, "min_gain": settings.min_gain,
                "text_sha256": stats.info.get("text_sha256")}

    def save(self, path: str | Path) -> Path:
        return save_json(path, FORMAT, asdict(self))


def load_tuned_errors(path: str | Path) -> TunedErrors:
    """A file TunedErrors.save wrote (`mc-gguf tuned-errors`), its ratios checked (finite and positive, for types
    ggml has)."""
    path = Path(path)
    doc = load_json(path, FORMAT, "tuned-errors file", TunedErrorsFileError)
    ratios, key = doc.get("ratios"), doc.get("key")
    if not isinstance(ratios, dict) or not isinstance(key, dict):
        raise TunedErrorsFileError(f"{path}: its ratios or key are not JSON objects")
    for name, ratio in ratios.items():
        try:
            quant_type(name)
        except ValueError as exc:
            raise TunedErrorsFileError(f"{path}: {exc}") from None
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
            raise TunedErrorsFileError(f"{path}: the ratio of {name} is {ratio!r}, not a positive number")
    return TunedErrors({name: float(r) for name, r in ratios.items()}, key)


def measured_tuned_errors(model_dir: str | Path, stats: CalibrationStats, settings: TuneSettings = TuneSettings(),
                          ray: str | None = None, progress: bool = True) -> TunedErrors:
    """The artifact of ``stats``' candidate types (tuned_error_ratios with the settings' sweeps)."""
    ratios = tuned_error_ratios(model_dir, stats, list(stats.types), settings=settings, ray=ray, progress=progress)
    return TunedErrors(ratios, TunedErrors.key_of(stats, settings))


def tuned_error_ratios(model_dir: str | Path, stats: CalibrationStats, types: list[str], sample: int = 8,
                       rows: int = 128, seed: int = 0, settings: TuneSettings = TuneSettings(),
                       ray: str | None = None, progress: bool = True) -> dict[str, float]:
    """{type: tuned loss / ggml's loss} for the tunable ``types``, on ``sample`` experts' ``rows`` rows (the module
    docstring); types tuning does not open get no entry (1). ``ray``: a Ray cluster's address, whose workers
    measure an expert each (cluster.py; the same ratios, summed in the same order)."""
    settings = replace(settings, lattice=False)   # the module's docstring says why
    ckpt = open_checkpoint(model_dir)
    hidden, ff = ckpt.expert_dims
    names = [q.name for q in (quant_type(t) for t in types) if tunable(q.qtype, hidden) and tunable(q.qtype, ff)]
    if not names or not stats.has_hessian:
        return {}
    rng = np.random.default_rng(seed)
    pairs = [(bid, xid) for bid, layer in stats.moe_layers for xid in range(ckpt.n_experts) if layer.count[xid] > 0]
    picked = [pairs[i] for i in sorted(rng.choice(len(pairs), min(sample, len(pairs)), replace=False))]
    # each picked expert's sampled rows per projection, drawn in one sequence as the experts are taken in order
    samples = [(bid, xid, {p: _rows(rng, ckpt.expert_shape(bid, p)[0], rows) for p in PROJECTIONS})
               for bid, xid in picked]
    totals = {t: np.zeros(2) for t in names}
    with tqdm(total=len(picked) * len(PROJECTIONS) * len(names), desc="tuned errors", unit="tensor",
              disable=not progress, dynamic_ncols=True) as bar:
        if ray is not None:
            from mc_gguf.quantize.cluster import stats_file
            from mc_gguf.ray_cluster import connect, ordered_results

            stats_path = stats_file(stats)
            connect(ray)
            calls = [(str(ckpt.path), stats_path, bid, xid, chosen, names, settings)
                     for bid, xid, chosen in samples]
            results = ordered_results(remote_expert_losses, calls, lambda c: f"layer {c[2]} expert {c[3]}")
        else:
            hessians = ExpertHessians(ckpt, stats, settings.device)
            results = (expert_losses(ckpt, stats, hessians, bid, xid, chosen, names, settings)
                       for bid, xid, chosen in samples)
        for losses in results:  # the sums in one order, wherever the losses were measured
            for name, k, loss in losses:
                totals[name][k] += loss
            bar.update(len(losses) // 2)
    return {t: float(tuned / plain) for t, (plain, tuned) in totals.items() if plain > 0}


def _rows(rng: np.random.Generator, n: int, rows: int) -> np.ndarray | None:
    return np.sort(rng.choice(n, rows, replace=False)) if n > rows else None


def expert_losses(ckpt, stats: CalibrationStats, hessians: ExpertHessians, bid: int, xid: int,
                  chosen: dict[str, np.ndarray | None], names: list[str],
                  settings: TuneSettings) -> list[tuple[str, int, float]]:
    """(type, 0 for ggml's quantizer or 1 tuned, loss) of expert ``xid``'s ``chosen`` rows of each projection
    (None: every row), projection by projection and type by type."""
    layer = stats.layers[bid]
    losses, shared = [], {}
    for projection in PROJECTIONS:
        weights = ckpt.expert_weight(bid, xid, projection)
        if chosen[projection] is not None:
            weights = weights[chosen[projection]]
        which = "mid" if projection == "down" else "in"
        if which not in shared:
            shared = {which: Hessian(hessians(bid, xid, which))}  # gate's is up's; down's replaces it
        hessian = shared[which]
        imatrix = layer.imatrix(which)[xid]
        for name in names:
            qtype = quant_type(name).qtype
            for k, data in enumerate((quants.quantize(weights, qtype, imatrix),
                                      tune_quantize(weights, hessian, qtype, imatrix, settings))):
                losses.append((name, k, _loss(weights, quants.dequantize(data, qtype, weights.shape[1]),
                                               hessian.damped)))
    return losses


def remote_expert_losses(model_dir: str, stats_path: str, bid: int, xid: int, chosen: dict, names: list[str],
                         settings: TuneSettings) -> list[tuple[str, int, float]]:
    """expert_losses as a Ray task: the worker opens the checkpoint and the statistics itself."""
    from mc_gguf.calibrate.stats import load_stats

    ckpt, stats = open_checkpoint(model_dir), load_stats(stats_path)
    return expert_losses(ckpt, stats, ExpertHessians(ckpt, stats, settings.device), bid, xid, chosen, names,
                         settings)


def _loss(weights: np.ndarray, quantized: np.ndarray, h: np.ndarray) -> float:
    """sum over rows of e H e^T, e = W - Q: the rows' products in float32, their sum in float64."""
    error = np.asarray(weights, np.float32) - quantized
    return float(np.sum(((error @ h) * error).astype(np.float64)))
