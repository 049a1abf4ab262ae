"""Tuned rounding and scales inside ggml's K-quant grids (and tuned i-quant scales), per expert projection.

The quantity minimised is the projection's output error on the tokens the
calibration routed to the expert,

    loss(Q) = sum over rows r of  e_r H e_r^T,   e = W - Q,   H = X^T X + damp * mean(diag) * I,

H the expert's input Hessian (calibrate --hessian, as GPTQ uses). The start
is GPTQ (gptq.py: ggml's own quantizer, block by block, with the error moved
onto the columns not yet quantized). ggml/kquants.py then opens the start's
super-blocks into their integers: fp16 ``d``/``dmin``, the small sub-block
scales and minimums, and each weight's ``q``. Coordinate descent on the exact
loss moves them one at a time, keeping a move only when the loss falls:

- each super-block's ``d`` and ``dmin``: the least-squares optimum along that
  coordinate, rounded to fp16 as block_qX_K stores it;
- each sub-block's integer scale and minimum, and each weight's ``q``: +-1
  within the type's range, the one of -1, 0, +1 nearest to the optimum along
  that coordinate (the loss is a parabola in each). Moves of more than one
  step, though each lowers the loss more, end in worse optima (5-7% higher
  loss on Q2_K and Q3_K).

With g = e H kept up to date, the change of the loss when Q moves by D on the
columns c is ``-2 D . g_c + D H_cc D^T``, so a move costs one row of H per
column, and a sweep over all weights costs what one evaluation of the loss
does (moves reach the rest of g lazily, per column block or super-block, as
GPTQ applies its updates). Sweeps repeat until one lowers the loss by less than ``min_gain``
of it. The integers are packed back by kquants.pack, so ggml dequantizes the
file's bytes to exactly the weights whose loss was minimised.

The i-quants (IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ4_XS; ggml/iquants.py) keep
the codes ggml's lattice search chose for GPTQ's columns, and the same
descent moves their fp16 ``d`` and integer sub-block scales (tune_scales).
Other types (IQ1_M, Q8_0, the 32-block fallbacks) keep GPTQ's result.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import gguf
import numpy as np
import torch

from mc_gguf.ggml import iquants, kquants
from mc_gguf.ggml.iquants import IBlocks
from mc_gguf.ggml.kquants import QK_K, KBlocks
from mc_gguf.quantize.gptq import DAMP, gptq_quantize

COLUMN_BLOCK = 128  # columns whose q moves are applied to g together


@dataclass(frozen=True)
class TuneSettings:
    iters: int = 8              # sweeps at most
    min_gain: float = 0.005     # stop when a sweep lowers the loss by less than this share of it
    device: str = "cpu"


def tunable(qtype: gguf.GGMLQuantizationType, n_per_row: int) -> bool:
    return (qtype.name in kquants.FORMATS or qtype.name in iquants.FORMATS) and n_per_row % QK_K == 0


def tune_quantize(weights: np.ndarray, hessian: np.ndarray, qtype: gguf.GGMLQuantizationType,
                  imatrix: np.ndarray | None = None, settings: TuneSettings = TuneSettings()) -> np.ndarray:
    """ggml's bytes [rows, row_bytes] of ``weights`` [rows, cols]: GPTQ, then coordinate descent on ``hessian``
    (a K-quant's every integer, an i-quant's scales)."""
    rows, cols = weights.shape
    start = gptq_quantize(weights, hessian, qtype, imatrix)
    if not tunable(qtype, cols) or settings.iters <= 0:
        return start
    if qtype.name in iquants.FORMATS:
        return iquants.pack(tune_scales(weights, damped(hessian), iquants.unpack(start, qtype.name),
                                        settings)).reshape(rows, -1)
    tuned = tune_blocks(weights, damped(hessian), kquants.unpack(start, qtype.name), settings)
    return kquants.pack(tuned).reshape(rows, -1)


def damped(hessian: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """H + damp * mean(diag H) * I, GPTQ's dampening (gptq.inverse_hessian_factor, which also sets the
    diagonal of never-activated columns to 1 before it)."""
    h = np.array(hessian, dtype=np.float64)
    h[np.diag_indices_from(h)] += damp * mean_diagonal(h)
    return h


def mean_diagonal(hessian: np.ndarray) -> float:
    """mean(diag H), the unit of the dampening, kept above 0 for an expert no token reached."""
    return max(float(np.mean(np.diag(hessian))), 1e-30)


def tune_blocks(weights: np.ndarray, hessian: np.ndarray, blocks: KBlocks,
                settings: TuneSettings = TuneSettings()) -> KBlocks:
    """``blocks`` (a quantization of ``weights`` [rows, cols]) moved by coordinate descent on ``hessian``."""
    state = _Descent(weights, hessian, blocks, torch.device(settings.device))
    _descend(state, settings, codes=True)
    return state.blocks()


@dataclass(frozen=True)
class _IScales:
    """An i-quant format as the scale sweeps see it: its sub-block scale is ls + c (moved by +-1), q is a * v."""
    sub_block: int
    n_sub: int
    scale_min: float
    scale_max: float
    has_min: bool = False


@dataclass(frozen=True)
class _IView:
    fmt: _IScales
    d: np.ndarray
    scales: np.ndarray
    q: np.ndarray
    dmin: None = None
    mins: None = None


def tune_scales(weights: np.ndarray, hessian: np.ndarray, blocks: IBlocks,
                settings: TuneSettings = TuneSettings()) -> IBlocks:
    """An i-quant's ``d`` and sub-block scales moved by coordinate descent on ``hessian``, its codes (ggml's
    search, after GPTQ) kept: w = (d * a (ls + c)) * v is K-quant-like with scale ls + c and q = a v."""
    f = blocks.fmt
    view = _IView(_IScales(f.sub_block, f.n_sub, f.c, f.scale_max + f.c), blocks.d,
                  blocks.ls.astype(np.float64) + f.c, f.a * blocks.v.astype(np.float64))
    state = _Descent(weights, hessian, view, torch.device(settings.device))
    _descend(state, settings, codes=False)
    ls = np.rint(state.scales.cpu().numpy() - f.c).astype(np.int32).reshape(-1, f.n_sub)
    return replace(blocks, d=state.d.cpu().numpy().astype(np.float32).reshape(-1), ls=ls)


def _descend(state: _Descent, settings: TuneSettings, codes: bool) -> None:
    """Sweeps until one gains under min_gain of the loss: the fp16 scales, the sub-block scales and, with
    ``codes``, every q."""
    loss = state.loss()
    for _ in range(settings.iters):
        state.refresh()
        state.sweep_super_scales()
        state.sweep_sub_scales()
        if codes:
            state.sweep_q()
        before, loss = loss, state.loss()
        if before - loss <= settings.min_gain * before:
            break


class _Descent:
    """The integers of a matrix's super-blocks as [rows, ...] tensors, with e = W - Q and g = e H."""

    def __init__(self, weights: np.ndarray, hessian: np.ndarray, blocks: KBlocks, device: torch.device):
        f = self.fmt = blocks.fmt
        rows, cols = weights.shape
        # float64 where the device has it: the gains are small differences of large sums
        dtype = torch.float32 if device.type == "mps" else torch.float64

        def tensor(a: np.ndarray, width: int) -> torch.Tensor:
            return torch.as_tensor(np.asarray(a), device=device).to(dtype).reshape(rows, width)

        n_super = cols // QK_K
        self.w = tensor(weights, cols)
        self.h = torch.as_tensor(hessian, device=device).to(dtype)
        self.d = tensor(blocks.d, n_super)
        self.scales = tensor(blocks.scales, n_super * f.n_sub)
        self.q = tensor(blocks.q, cols)
        self.dmin = tensor(blocks.dmin, n_super) if f.has_min else None
        self.mins = tensor(blocks.mins, n_super * f.n_sub) if f.has_min else None
        self.refresh()

    def _per_weight(self, per_sub: torch.Tensor) -> torch.Tensor:
        return per_sub.repeat_interleave(self.fmt.sub_block, dim=1)

    def _per_sub(self, per_super: torch.Tensor) -> torch.Tensor:
        return per_super.repeat_interleave(self.fmt.n_sub, dim=1)

    def dequantized(self) -> torch.Tensor:
        """Q [rows, cols] in dequantize_row_qX_K's formula: (d * scale) * q - dmin * min."""
        q = self._per_weight(self._per_sub(self.d) * self.scales) * self.q
        if self.fmt.has_min:
            q = q - self._per_weight(self._per_sub(self.dmin) * self.mins)
        return q

    def refresh(self) -> None:
        """e and g recomputed from the integers (moves update them incrementally in between)."""
        self.e = self.w - self.dequantized()
        self.g = self.e @ self.h

    def loss(self) -> float:
        return float(torch.sum(self.e * self.g))

    def _frame(self, b: int) -> _Frame:
        return _Frame(self, slice(b * QK_K, (b + 1) * QK_K))

    @staticmethod
    def _best_move(slope: torch.Tensor, curvature: torch.Tensor, values: torch.Tensor, low: float,
                   high: float) -> torch.Tensor:
        """The move (-1, 0 or +1) of each row's integer ``values`` [rows] within [low, high] that lowers its
        loss most, where moving by m lowers it by ``2 m slope - m^2 curvature``: slope / curvature rounded
        and clamped (0 where the curvature is 0: the value does not change Q)."""
        usable = curvature > 0
        t = torch.where(usable, slope / torch.where(usable, curvature, 1.0), 0.0)
        return torch.round(t).clamp_(-1, 1).clamp_(low - values, high - values)

    def sweep_super_scales(self) -> None:
        """Each super-block's d (and dmin) to its least-squares value on the exact loss, rounded to fp16."""
        f = self.fmt
        for b in range(self.d.shape[1]):
            frame, cols = self._frame(b), slice(b * QK_K, (b + 1) * QK_K)
            subs = slice(b * f.n_sub, (b + 1) * f.n_sub)
            directions = [(self.d, self._per_weight(self.scales[:, subs]) * self.q[:, cols])]
            if f.has_min:
                directions.append((self.dmin, -self._per_weight(self.mins[:, subs])))
            for scale, a in directions:
                slope, curvature = frame.slope_and_curvature(a, slice(None))
                usable = curvature > 0
                new = (scale[:, b] + slope / torch.where(usable, curvature, 1.0)).to(torch.float16).to(scale.dtype)
                delta = torch.nan_to_num((new - scale[:, b])[:, None] * a)
                take = usable & torch.isfinite(new) & (frame.gain(delta, slice(None)) > 0)
                scale[:, b] = torch.where(take, new, scale[:, b])
                frame.apply(torch.where(take[:, None], delta, 0.0), slice(None))
            frame.close()

    def sweep_sub_scales(self) -> None:
        """Each sub-block's integer scale (and minimum) by +-1."""
        f = self.fmt
        for b in range(self.d.shape[1]):
            frame = self._frame(b)
            for k in range(b * f.n_sub, (b + 1) * f.n_sub):
                cols = slice(k * f.sub_block, (k + 1) * f.sub_block)
                within = slice(cols.start - b * QK_K, cols.stop - b * QK_K)
                directions = [(self.scales, self.d[:, b:b + 1] * self.q[:, cols], f.scale_min, f.scale_max)]
                if f.has_min:
                    directions.append((self.mins, -self.dmin[:, b:b + 1].expand(-1, f.sub_block), 0, f.min_max))
                for ints, unit, low, high in directions:
                    step = self._best_move(*frame.slope_and_curvature(unit, within), ints[:, k], low, high)
                    ints[:, k] += step
                    frame.apply(step[:, None] * unit, within)
            frame.close()

    def sweep_q(self) -> None:
        """Each weight's q by +-1, the moves of a column block applied to g together.

        Within a block the columns go one at a time, each move changing g on the columns after it. The
        block is held transposed, [width, rows], so that each column is a contiguous row of views made
        once, and a column costs a few calls: its move is g / (unit * H_jj) rounded and clamped as in
        _best_move, and g's update is one outer product with row j of H."""
        f = self.fmt
        step = self._per_weight(self._per_sub(self.d) * self.scales)
        diag = torch.diagonal(self.h)
        cols_total = self.q.shape[1]
        for first in range(0, cols_total, COLUMN_BLOCK):
            cols = slice(first, min(cols_total, first + COLUMN_BLOCK))
            unit = step[:, cols].T.contiguous()                  # [width, rows]
            scale = unit * diag[cols, None]                      # the move is g / scale
            per_g = torch.where(scale != 0, 1 / torch.where(scale != 0, scale, 1.0), 0.0)
            g_block = self.g[:, cols].T.contiguous()
            q_block = self.q[:, cols].T
            low, high = f.q_min - q_block, f.q_max - q_block
            moves = torch.empty_like(unit)
            h_rows = self.h[cols, cols].unbind(0)
            for j, (g_j, k_j, u_j, lo_j, hi_j, m_j) in enumerate(zip(
                    g_block.unbind(0), per_g.unbind(0), unit.unbind(0), low.unbind(0), high.unbind(0),
                    moves.unbind(0))):
                torch.mul(g_j, k_j, out=m_j)
                m_j.round_().clamp_(-1, 1).clamp_(lo_j, hi_j)
                g_block.addr_(h_rows[j], m_j * u_j, alpha=-1)   # the columns before j are done: harmless
            self.q[:, cols] += moves.T
            delta = (moves * unit).T
            self.e[:, cols] -= delta
            self.g -= delta @ self.h[cols, :]

    def blocks(self) -> KBlocks:
        f = self.fmt

        def ints(t: torch.Tensor | None, width: int) -> np.ndarray | None:
            return None if t is None else t.cpu().numpy().astype(np.int32).reshape(-1, width)

        def halves(t: torch.Tensor | None) -> np.ndarray | None:
            return None if t is None else t.cpu().numpy().astype(np.float32).reshape(-1)

        return KBlocks(f, halves(self.d), ints(self.scales, f.n_sub), ints(self.q, QK_K), halves(self.dmin),
                       ints(self.mins, f.n_sub))


class _Frame:
    """g on one super-block's columns, kept up to date by the moves inside it; the moves reach e and the rest
    of g together when the frame closes (one [rows, 256] x [256, cols] product instead of one per move)."""

    def __init__(self, descent: _Descent, cols: slice):
        self.descent, self.cols = descent, cols
        self.g = descent.g[:, cols].clone()
        self.h = descent.h[cols, cols]
        self.delta = torch.zeros_like(self.g)

    def slope_and_curvature(self, a: torch.Tensor, within: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """a . g and a H a [rows] of the direction ``a`` [rows, width] on the frame's columns ``within``:
        moving Q by t a lowers the loss by 2 t slope - t^2 curvature."""
        return torch.sum(a * self.g[:, within], dim=1), torch.sum((a @ self.h[within, within]) * a, dim=1)

    def gain(self, delta: torch.Tensor, within: slice) -> torch.Tensor:
        """How much the loss of each row falls when Q moves by ``delta`` on the frame's columns ``within``."""
        slope, curvature = self.slope_and_curvature(delta, within)
        return 2 * slope - curvature

    def apply(self, delta: torch.Tensor, within: slice) -> None:
        self.delta[:, within] += delta
        self.g -= delta @ self.h[within, :]

    def close(self) -> None:
        d = self.descent
        d.e[:, self.cols] -= self.delta
        d.g -= self.delta @ d.h[self.cols, :]


def tuned_error_ratios(model_dir, stats, types: list[str], sample: int = 8, rows: int = 128, seed: int = 0,
                       settings: TuneSettings = TuneSettings(), progress: bool = True) -> dict[str, float]:
    """How much tuning lowers each tunable type's error, for allocate's ``error_scale``.

    The calibration measured every type's error with ggml's quantizer alone; tuning lowers the K-quants'
    errors several times, the i-quants' (whose codes it keeps) less. On ``sample`` experts drawn (seeded) across the
    layers, ``rows`` rows drawn from each projection (a row's loss depends on that row alone, so a sample
    of rows estimates the matrix's ratio at a fraction of the cost: 128 of Mixtral 8x7B's 14336) are
    quantized both ways and the loss on the projection's Hessian summed: the ratio tuned / untuned per type. Types
    tuning does not open get no entry (1).
    """
    from tqdm import tqdm

    from mc_gguf.ggml import quants
    from mc_gguf.ggml.types import quant_type
    from mc_gguf.hf.checkpoint import open_checkpoint
    from mc_gguf.quantize.hessian import ExpertHessians

    ckpt = open_checkpoint(model_dir)
    hidden, ff = ckpt.expert_dims
    names = [q.name for q in (quant_type(t) for t in types) if tunable(q.qtype, hidden) and tunable(q.qtype, ff)]
    if not names or not stats.has_hessian:
        return {}
    rng = np.random.default_rng(seed)
    pairs = [(bid, xid) for bid, layer in stats.moe_layers for xid in range(ckpt.n_experts) if layer.count[xid] > 0]
    picked = [pairs[i] for i in sorted(rng.choice(len(pairs), min(sample, len(pairs)), replace=False))]
    totals = {t: np.zeros(2) for t in names}
    hessians = ExpertHessians(ckpt, stats)
    with tqdm(total=len(picked) * 3 * len(names), desc="tuned errors", unit="tensor", disable=not progress) as bar:
        for bid, xid in picked:
            layer = stats.layers[bid]
            for projection in ("gate", "up", "down"):
                weights = ckpt.expert_weight(bid, xid, projection)
                if len(weights) > rows:
                    weights = weights[np.sort(rng.choice(len(weights), rows, replace=False))]
                which = "mid" if projection == "down" else "in"
                hessian = hessians(bid, xid, which)
                imatrix = layer.imatrix(which)[xid]
                h = damped(hessian)
                for name in names:
                    qtype = quant_type(name).qtype
                    for k, data in enumerate((quants.quantize(weights, qtype, imatrix),
                                              tune_quantize(weights, hessian, qtype, imatrix, settings))):
                        error = weights - quants.dequantize(data, qtype, weights.shape[1])
                        totals[name][k] += float(np.sum((error @ h) * error))
                    bar.update(1)
    return {t: float(tuned / plain) for t, (plain, tuned) in totals.items() if plain > 0}
