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
column. A sweep visits the super-blocks in order and moves, in each, its
``d``/``dmin``, its sub-block scales and minimums, then its q column by
column, with g kept on the super-block's 256 columns only; the moves reach
the rest of g once per super-block, when it is done (one [rows, 256] x
[256, cols] product, as GPTQ applies its lazy batch updates). A sweep thus
costs one product of the size of e H, the only cost that grows with the
square of the inputs: at Mixtral 8x7B's down projection (14336 inputs) it is
1.7 TFLOP. Everything is computed in float32 (2-3x float64's speed on a CPU;
the moves' gains are measured from the same g they change, and the loss, in
float64 sums, only decides when to stop); ``TuneSettings.exact`` computes in
float64 and converges to the last bit of a local optimum, as the brute-force
tests check. Sweeps repeat until one lowers the
loss by less than ``min_gain`` of it. The integers are packed back by kquants.pack, so ggml dequantizes the
file's bytes to exactly the weights whose loss was minimised.

The i-quants (IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ4_XS; ggml/iquants.py) start
from the codes ggml's lattice search chose for GPTQ's columns, and the same
descent moves their fp16 ``d`` and integer sub-block scales (tune_scales).
In IQ1_S, IQ2_XXS and IQ2_XS, whose codes are points of a grid, one per group
of 8 weights, ``TuneSettings.lattice`` (--tune-lattice) moves the points too: each group
to the best of every grid point with its signs (IQ1_S: its delta) kept and,
for the signed grids, every sign pattern of its magnitudes, scored on the
exact loss (_lattice_codes). ggml's search picks the grid point nearest each
group on the importance matrix's diagonal alone; the descent sees the
correlations between inputs, as GPTQ does. Other types (IQ3_XXS's and
IQ4_XS's codes, IQ1_M, Q8_0, the 32-block fallbacks) keep GPTQ's codes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import gguf
import numpy as np
import torch

from mc_gguf.ggml import iquants, kquants
from mc_gguf.ggml.iquants import IBlocks
from mc_gguf.ggml.kquants import QK_K, KBlocks
from mc_gguf.quantize.gptq import Hessian, damped, gptq_quantize
from mc_gguf.quantize.settings import TuneSettings


def tunable(qtype: gguf.GGMLQuantizationType, n_per_row: int) -> bool:
    return (qtype.name in kquants.FORMATS or qtype.name in iquants.FORMATS) and n_per_row % QK_K == 0


def tune_quantize(weights: np.ndarray, hessian: np.ndarray | Hessian, qtype: gguf.GGMLQuantizationType,
                  imatrix: np.ndarray | None = None, settings: TuneSettings = TuneSettings(),
                  single_use: bool = False) -> np.ndarray:
    """ggml's bytes [rows, row_bytes] of ``weights`` [rows, cols]: GPTQ, then coordinate descent on ``hessian``
    (a K-quant's every integer, an i-quant's scales). A ``Hessian`` shared by several calls is factored once;
    one that is this call's alone (``single_use``) gives up GPTQ's factor and its undamped matrix before the
    descent, which needs neither."""
    rows, cols = weights.shape
    hessian = Hessian.of(hessian)
    start = gptq_quantize(weights, hessian, qtype, imatrix)
    if single_use:
        hessian.release("factor")
    if not tunable(qtype, cols) or settings.iters <= 0:
        return start
    h = damped(hessian.matrix, hessian.damp) if settings.exact else hessian.damped
    if single_use:
        hessian.release("matrix")
    if qtype.name in iquants.FORMATS:
        return iquants.pack(tune_scales(weights, h, iquants.unpack(start, qtype.name), settings)).reshape(rows, -1)
    tuned = tune_blocks(weights, h, kquants.unpack(start, qtype.name), settings)
    return kquants.pack(tuned).reshape(rows, -1)


def tune_blocks(weights: np.ndarray, hessian: np.ndarray, blocks: KBlocks,
                settings: TuneSettings = TuneSettings(), descent: type[_Descent] | None = None) -> KBlocks:
    """``blocks`` (a quantization of ``weights`` [rows, cols]) moved by coordinate descent on ``hessian`` (by
    ``descent``, a _Descent whose products are other: scripts/bench_block_objective.py's, a Hessian per row)."""
    state = (descent or _Descent)(weights, hessian, blocks, torch.device(settings.device), settings.exact)
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
                settings: TuneSettings = TuneSettings(), descent: type[_Descent] | None = None) -> IBlocks:
    """An i-quant's ``d`` and sub-block scales moved by coordinate descent on ``hessian``, and, for a lattice
    type (iquants.LATTICES, with ``settings.lattice``), its groups' grid points; other types keep their codes
    (ggml's search, after GPTQ): w = (d * a (ls + c)) * v is K-quant-like with scale ls + c and q = a v.
    ``descent`` as tune_blocks'."""
    f = blocks.fmt
    lattice = iquants.LATTICES.get(f.name) if settings.lattice else None
    view = _IView(_IScales(f.sub_block, f.n_sub, f.c, f.scale_max + f.c), blocks.d,
                  blocks.ls.astype(np.float64) + f.c, f.a * blocks.v.astype(np.float64))
    state = (descent or _Descent)(weights, hessian, view, torch.device(settings.device), settings.exact, lattice)
    _descend(state, settings, codes=lattice is not None)
    ls = np.rint(state.scales.cpu().numpy() - f.c).astype(np.int32).reshape(-1, f.n_sub)
    v = blocks.v if lattice is None else (state.q.cpu().numpy() / f.a).astype(np.float32).reshape(blocks.v.shape)
    return replace(blocks, d=state.d.cpu().numpy().astype(np.float32).reshape(-1), ls=ls, v=v)


def _descend(state: _Descent, settings: TuneSettings, codes: bool) -> None:
    """Sweeps until one gains under min_gain of the loss: in each super-block the fp16 scales, the sub-block
    scales and, with ``codes``, every q."""
    loss = state.loss()
    for _ in range(settings.iters):
        state.sweep(codes)
        before, loss = loss, state.loss()
        if before - loss <= settings.min_gain * before:
            break


class _Descent:
    """The integers of a matrix's super-blocks as [rows, ...] tensors, with e = W - Q and g = e H, all in
    float32 (float64 when ``exact``, where the device has it)."""

    def __init__(self, weights: np.ndarray, hessian: np.ndarray, blocks: KBlocks, device: torch.device,
                 exact: bool = False, lattice: iquants.Lattice | None = None):
        f = self.fmt = blocks.fmt
        rows, cols = weights.shape
        dtype = torch.float64 if exact and device.type != "mps" else torch.float32

        def tensor(a: np.ndarray, width: int) -> torch.Tensor:
            return torch.as_tensor(np.asarray(a), device=device).to(dtype).reshape(rows, width)

        n_super = cols // QK_K
        self.h = torch.as_tensor(np.asarray(hessian), device=device).to(dtype)
        self.w = tensor(weights, cols)
        self.d = tensor(blocks.d, n_super)
        self.scales = tensor(blocks.scales, n_super * f.n_sub)
        self.q = tensor(blocks.q, cols)
        self.dmin = tensor(blocks.dmin, n_super) if f.has_min else None
        self.mins = tensor(blocks.mins, n_super * f.n_sub) if f.has_min else None
        self.lattice = lattice   # an i-quant whose grid points move too (q = a v, v a group's point)
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
        """e and g = e H from the integers."""
        self.e = self.w - self.dequantized()
        self.g = self._times(self.e, self.h)

    @staticmethod
    def _times(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """x H, H the Hessian or one of its blocks (``_block``): what every move's change of g is made of."""
        return x @ h

    @staticmethod
    def _block(h: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
        return h[rows, cols]

    def _frame(self, b: int) -> _Frame:
        return _Frame(self, b)

    def loss(self) -> float:
        return float(torch.sum(self.e * self.g, dtype=torch.float64 if self.h.device.type != "mps" else None))

    @staticmethod
    def _best_move(slope: torch.Tensor, curvature: torch.Tensor, values: torch.Tensor, low: float,
                   high: float) -> torch.Tensor:
        """The move (-1, 0 or +1) of each row's integer ``values`` [rows] within [low, high] that lowers its
        loss most, where moving by m lowers it by ``2 m slope - m^2 curvature``: slope / curvature rounded
        and clamped (0 where the curvature is 0: the value does not change Q)."""
        usable = curvature > 0
        t = torch.where(usable, slope / torch.where(usable, curvature, 1.0), 0.0)
        return torch.round(t).clamp_(-1, 1).clamp_(low - values, high - values)

    def sweep(self, codes: bool) -> None:
        """One pass over the super-blocks, each moved whole inside its frame, then its moves applied to g."""
        for b in range(self.d.shape[1]):
            frame = self._frame(b)
            self._super_scales(frame, b)
            self._sub_scales(frame, b)
            if codes:
                (self._codes if self.lattice is None else self._lattice_codes)(frame, b)
            frame.close()

    def _super_scales(self, frame: _Frame, b: int) -> None:
        """The super-block's d (and dmin) to its least-squares value on the exact loss, rounded to fp16."""
        f = self.fmt
        cols, subs = frame.cols, slice(b * f.n_sub, (b + 1) * f.n_sub)
        directions = [(self.d, self._per_weight(self.scales[:, subs]) * self.q[:, cols])]
        if f.has_min:
            directions.append((self.dmin, -self._per_weight(self.mins[:, subs])))
        for scale, a in directions:
            a_h = self._times(a, frame.h)
            slope, curvature = torch.sum(a * frame.g, dim=1), torch.sum(a_h * a, dim=1)
            usable = curvature > 0
            new = (scale[:, b] + slope / torch.where(usable, curvature, 1.0)).to(torch.float16).to(scale.dtype)
            t = torch.nan_to_num(new - scale[:, b])
            take = usable & torch.isfinite(new) & (2 * t * slope - t * t * curvature > 0)
            scale[:, b] = torch.where(take, new, scale[:, b])
            t = torch.where(take, t, 0.0)[:, None]
            frame.apply(t * a, moved=t * a_h)

    def _sub_scales(self, frame: _Frame, b: int) -> None:
        """Each of the super-block's sub-block integer scales (and minimums) by +-1, in order. A sub-block's
        g is the frame's, less what the moves of the sub-blocks before it changed there (one small product);
        the moves reach the frame's g together, at the end."""
        f = self.fmt
        moved = torch.zeros_like(frame.g)   # Q's change on the frame's columns in this pass
        for k in range(b * f.n_sub, (b + 1) * f.n_sub):
            cols = slice(k * f.sub_block, (k + 1) * f.sub_block)
            within = slice(cols.start - b * QK_K, cols.stop - b * QK_K)
            before, h_kk = slice(0, within.start), self._block(frame.h, within, within)
            g = frame.g[:, within] - self._times(moved[:, before], self._block(frame.h, before, within))
            directions = [(self.scales, self.d[:, b:b + 1] * self.q[:, cols], f.scale_min, f.scale_max)]
            if f.has_min:
                directions.append((self.mins, -self.dmin[:, b:b + 1].expand(-1, f.sub_block), 0, f.min_max))
            for ints, unit, low, high in directions:
                slope, curvature = torch.sum(unit * g, dim=1), torch.sum(self._times(unit, h_kk) * unit, dim=1)
                step = self._best_move(slope, curvature, ints[:, k], low, high)
                ints[:, k] += step
                delta = step[:, None] * unit
                moved[:, within] += delta
                g = g - self._times(delta, h_kk)
        frame.apply(moved)

    def _codes(self, frame: _Frame, b: int) -> None:
        """Each of the super-block's q by +-1, column by column, each move changing g on the columns after it.

        The frame's g is held transposed, [256, rows], so that each column is a contiguous row of views made
        once, and a column costs a few calls: its move is g / (unit * H_jj) rounded and clamped as in
        _best_move. The moves reach g as GPTQ's lazy batches do: a column's move updates g on its own chunk
        of CODE_CHUNK columns (one outer product with a piece of row j of H), and a chunk's moves reach the
        frame's later columns in one product when the chunk is done."""
        f = self.fmt
        subs = slice(b * f.n_sub, (b + 1) * f.n_sub)
        unit = self._per_weight(self.d[:, b:b + 1] * self.scales[:, subs]).T.contiguous()   # [256, rows]
        scale = unit * torch.diagonal(frame.h)[:, None]                                  # the move is g / scale
        per_g = torch.where(scale != 0, 1 / torch.where(scale != 0, scale, 1.0), 0.0)
        g_block = frame.g.T.contiguous()
        q_block = self.q[:, frame.cols].T
        low, high = f.q_min - q_block, f.q_max - q_block
        moves, steps = torch.empty_like(unit), torch.empty_like(unit)   # steps: moves * unit, Q's change
        for first in range(0, QK_K, CODE_CHUNK):
            chunk, after = slice(first, first + CODE_CHUNK), slice(first + CODE_CHUNK, QK_K)
            g_chunk = g_block[chunk]
            h_rows = frame.h[chunk, chunk].unbind(0)
            for j, (g_j, k_j, u_j, lo_j, hi_j, m_j, s_j) in enumerate(zip(*(
                    t[chunk].unbind(0) for t in (g_block, per_g, unit, low, high, moves, steps)))):
                torch.mul(g_j, k_j, out=m_j)
                m_j.round_().clamp_(-1, 1).clamp_(lo_j, hi_j)
                torch.mul(m_j, u_j, out=s_j)
                g_chunk.addr_(h_rows[j], s_j, alpha=-1)   # the chunk's columns before j are done: harmless
            if after.start < QK_K:
                g_block[after].addmm_(frame.h[after, chunk], steps[chunk], alpha=-1)
        self.q[:, frame.cols] += moves.T
        frame.apply(steps.T)

    def _lattice_codes(self, frame: _Frame, b: int) -> None:
        """Each of the super-block's groups of 8 weights to the best of the points its lattice lets it move to
        (iquants.Lattice.families: another grid point with the same signs or delta, or, for signed grids,
        other signs), group by group, each move changing g on the frame. A group lies in one sub-block, so
        its Q is u * c (u = d * scale, c = a * v, one of the points a * (P_k * m + o)), and the gain of moving
        c to c' is 2 u (c' - c) . g - u^2 (c' - c) H (c' - c)^T, H the group's block of the Hessian. For every
        point p = P_k * m + o of a family at once, p . y is (m * y) P^T + o sum y and p H p^T is
        (m m^T * H) (P (x) P)^T + 2 o (m * H 1) P^T + o^2 1 H 1: products of [rows, 64] and [64, K] at most.
        A row moves to its best point where the gain is positive."""
        f, group, a = self.fmt, iquants.GROUP, self.lattice.a
        subs = slice(b * f.n_sub, (b + 1) * f.n_sub)
        unit = self._per_weight(self.d[:, b:b + 1] * self.scales[:, subs])   # [rows, 256]
        for first in range(0, QK_K, group):
            inner = slice(first, first + group)
            cols = slice(frame.cols.start + first, frame.cols.start + first + group)
            h = frame.h[inner, inner]
            q = self.q[:, cols]                     # c [rows, 8]
            u = unit[:, first:first + 1]
            hq = q @ h
            # the gain of c' is F(c') - F(c), F(c') = 2 u c' . (g + u H c) - u^2 c' H c'^T; with c' = a p,
            # F = p . y - quadratic p H p^T
            y = 2 * a * u * (frame.g[:, inner] + u * hq)
            quadratic = (u * a) ** 2
            best_gain = torch.sum(q * y, -1, keepdim=True) / a - (u * u) * torch.sum(q * hq, -1, keepdim=True)
            best = q
            for points, pairs, m, o in self.lattice.families(q / a):   # pairs: P (x) P [K, 64]
                if m is None:   # c' = a (P_k + o): the same P_k H P_k^T and P_k H 1 for every row
                    gain = y @ points.T - quadratic * (pairs @ h.reshape(-1))
                    if o is not None:
                        gain += o[:, None] * (y.sum(-1, keepdim=True) - quadratic * 2 * (h.sum(0) @ points.T))
                        gain -= quadratic * (o * o)[:, None] * h.sum()
                else:           # c' = a P_k * m (o is 0)
                    gain = (m * y) @ points.T - quadratic * (((m[:, :, None] * m[:, None, :]) * h).reshape(len(q), -1)
                                                             @ pairs.T)
                top, index = gain.max(-1, keepdim=True)
                point = a * (points[index[:, 0]] * (1 if m is None else m) + (0 if o is None else o[:, None]))
                better = top > best_gain
                best_gain = torch.where(better, top, best_gain)
                best = torch.where(better, point, best)
            step = u * (best - q)
            self.q[:, cols] = best
            frame.apply_cols(step, inner)

    def blocks(self) -> KBlocks:
        f = self.fmt

        def ints(t: torch.Tensor | None, width: int) -> np.ndarray | None:
            return None if t is None else t.cpu().numpy().astype(np.int32).reshape(-1, width)

        def halves(t: torch.Tensor | None) -> np.ndarray | None:
            return None if t is None else t.cpu().numpy().astype(np.float32).reshape(-1)

        return KBlocks(f, halves(self.d), ints(self.scales, f.n_sub), ints(self.q, QK_K), halves(self.dmin),
                       ints(self.mins, f.n_sub))


CODE_CHUNK = 32  # the columns whose moves update each other's g one by one (_codes)


class _Frame:
    """g on super-block ``b``'s columns, kept up to date by the moves inside it; the moves reach e and the
    rest of g together when the frame closes (one [rows, 256] x [256, cols] product instead of one per move)."""

    def __init__(self, descent: _Descent, b: int):
        self.descent, self.cols = descent, slice(b * QK_K, (b + 1) * QK_K)
        self.g = descent.g[:, self.cols].clone()
        self.h = descent.h[self.cols, self.cols]
        self.delta = torch.zeros_like(self.g)

    def apply(self, delta: torch.Tensor, moved: torch.Tensor | None = None) -> None:
        """Q moves by ``delta`` [rows, 256] on the frame's columns; ``moved`` is delta H where the caller has it."""
        self.delta += delta
        self.g -= delta @ self.h if moved is None else moved

    def apply_cols(self, delta: torch.Tensor, inner: slice) -> None:
        """Q moves by ``delta`` [rows, width] on the frame's columns ``inner`` alone."""
        self.delta[:, inner] += delta
        self.g -= delta @ self.h[inner, :]

    def close(self) -> None:
        """e and g everywhere take the frame's moves: g outside the frame by the one large product, g inside it
        as the frame kept it."""
        d = self.descent
        d.e[:, self.cols] -= self.delta
        d.g.addmm_(self.delta, d.h[self.cols, :], alpha=-1)
        d.g[:, self.cols] = self.g
