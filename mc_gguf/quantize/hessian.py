"""GPTQ's Hessians, built one expert at a time from what ``calibrate --hessian`` kept.

For expert e of a layer, with x_t the MoE block's input of calibration token t and g_t the weight the block
applied to e's output for t (0 where t was not routed to e):

    H_in  = sum_t g_t^2 x_t x_t^T                                  (the input of gate and up)
    H_mid = sum_t g_t^2 z_t z_t^T,  z_t = glu(x_t gate^T, x_t up^T)  (the input of down)

since each token's error reaches the layer's output times the routing weight it was given.

The down projection sees the quantized gate and up, not the checkpoint's: its input is z_t' = glu(x_t Gq^T,
x_t Uq^T), and what it should still produce is y_t = z_t W^T. ``down_target`` refits W to that,

    W' = argmin_Q  sum_t g_t^2 |y_t - z_t' Q^T|^2 + lambda |Q - W|^2 = (W C + lambda W) (H' + lambda I)^-1
    H' = sum_t g_t^2 z_t' z_t'^T,   C = sum_t g_t^2 z_t z_t'^T,

so that quantizing W' on H' + lambda I (GPTQ and tuning damp it by the fit's ridge) minimises the expert's
own output error, the part of gate's and up's error that down can take back included: up to a constant,
sum_t g_t^2 |y_t - z_t' Q^T|^2 + lambda |Q - W|^2 is (W' - Q) (H' + lambda I) (W' - Q)^T summed over rows.
The ridge pulls towards W, not 0, so where the inputs say nothing (and where gate and up are exact) W' is W.
lambda is chosen on held-out tokens (a fit on one fold of them scored on the other): where an expert has
few tokens per input feature the fit would learn its calibration tokens, and then W itself (on H', GPTQ's
dampening) is kept. The statistics keep every token's x_t and routing instead of these sums (a layer's
E x (H^2 + F^2) of them is 7 GB at Mixtral 8x7B's shapes), so only one layer's inputs (tokens x H float32:
64 MB for 4096 tokens of Mixtral) and one expert's Hessian are in memory while quantizing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import cho_factor, cho_solve

from mc_gguf.calibrate.forward import load_expert
from mc_gguf.calibrate.quant_error import expert_hidden
from mc_gguf.calibrate.stats import CalibrationStats
from mc_gguf.errors import McGgufError
from mc_gguf.hf.checkpoint import Checkpoint
from mc_gguf.quantize.gptq import DampedCholesky, Hessian, damped, mean_diagonal


class ExpertHessians:
    """``hessians(bid, xid, which)``: expert ``xid`` of layer ``bid``'s Hessian [n, n] float32 of the input of
    gate and up (``which`` "in") or of down ("mid"), from the statistics of ``ckpt``; the inputs of the last
    layer asked for are kept until another layer is asked for. The products run on ``device`` (the sums in
    float64 where it has it), the results come back to the CPU."""

    def __init__(self, ckpt: Checkpoint, stats: CalibrationStats, device: str | torch.device = "cpu"):
        if not stats.has_hessian:
            raise McGgufError("GPTQ needs the experts' Hessians: calibrate with --hessian")
        self.ckpt = ckpt
        self.stats = stats
        self.device = torch.device(device)
        self.wide = torch.float32 if self.device.type == "mps" else torch.float64
        self.glu = ckpt.arch.expert_activation.glu(ckpt.config)
        self._bid: int | None = None
        self._inputs: torch.Tensor | None = None

    def inputs(self, bid: int) -> torch.Tensor:
        if self._bid != bid:
            self._bid, self._inputs = None, None  # the last layer's go before the next layer's are read
            self._inputs = torch.from_numpy(self.stats.moe_input(bid)).to(self.device)
            self._bid = bid
        return self._inputs

    def routed(self, bid: int, xid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, g): the calibration tokens routed to the expert and the weight [n, 1] the block gave it."""
        layer = self.stats.layers[bid]
        mine = torch.from_numpy(layer.routed_ids == xid)
        tokens = mine.any(-1).nonzero().squeeze(-1)
        g = (torch.from_numpy(layer.routed_weights)[tokens] * mine[tokens]).sum(-1, keepdim=True)
        return tokens.to(self.device), g.to(self.device)

    def __call__(self, bid: int, xid: int, which: str) -> np.ndarray:
        tokens, g = self.routed(bid, xid)
        with torch.no_grad():
            x = self.inputs(bid)[tokens]
            if which == "mid":
                x = expert_hidden(x, load_expert(self.ckpt, bid, xid).float32().to(self.device), self.glu)
            xw = x * g
            return (xw.T @ xw).cpu().numpy()

    def down_target(self, bid: int, xid: int, gate_up: list[np.ndarray]) -> DownTarget:
        """The target and Hessian of expert ``xid``'s down projection when its gate and up compute with the
        weights [F, H] in ``gate_up`` (their dequantized weights; the list is emptied, so that they are freed
        once summed where the caller keeps no other reference), as the module's docstring derives them, the
        ridge chosen on held-out tokens; token by token in chunks, so that no [tokens, F] matrix of all of
        them is formed."""
        gate, up = gate_up
        gate_up.clear()
        expert = load_expert(self.ckpt, bid, xid).float32().to(self.device)
        quantized = expert.with_weights(torch.from_numpy(np.asarray(gate, np.float32)).to(self.device),
                                        torch.from_numpy(np.asarray(up, np.float32)).to(self.device), expert.down)
        tokens, g = self.routed(bid, xid)
        ff, hidden = expert.down.shape[1], expert.down.shape[0]
        # H' and b = C^T W^T = sum_t g^2 z_t' y_t^T over every token, and over the first of two folds of them
        # (alternate runs of FOLD_RUN), which only chooses the ridge: float32, as its fits factor in float32.
        # The total H' in bands of GRAM_BAND rows, so that its float64 sum is rounded to float32 a band at a time
        bands = _row_bands(ff)
        h = [torch.zeros(band.stop - band.start, ff, dtype=self.wide, device=self.device) for band in bands]
        b = torch.zeros(ff, hidden, dtype=self.wide, device=self.device)
        h_first = torch.zeros(ff, ff, device=self.device)
        rows = torch.from_numpy(ridge_rows(hidden)).to(self.device)  # the first fold's b only where the ridge reads it
        b_first = torch.zeros(ff, len(rows), device=self.device)
        with torch.no_grad():
            for first in range(0, len(tokens), FOLD_RUN):
                x = self.inputs(bid)[tokens[first:first + FOLD_RUN]]
                gw = g[first:first + FOLD_RUN]
                z_q = expert_hidden(x, quantized, self.glu) * gw
                y = (expert_hidden(x, expert, self.glu) * gw) @ expert.down.T
                in_first = (first // FOLD_RUN) % 2 == 0
                # a run's products in float32 (256 terms), their sum over the runs in float64, added a band of
                # H' rows at a time and widened as they are added (no [F, F] product held beside the sums)
                for h_band, band in zip(h, bands):
                    product = z_q[:, band].T @ z_q
                    h_band.add_(product)
                    if in_first:
                        h_first[band].add_(product)
                    del product
                product = z_q.T @ y
                b.add_(product)
                if in_first:
                    b_first.add_(product[:, rows])
                del product
        w = expert.down.cpu().numpy()
        del expert, quantized, gate, up   # the fit's sums are what must fit in memory now
        total = np.empty((ff, ff), np.float32)
        for band in bands:
            total[band] = h.pop(0).cpu().numpy()   # each float64 band freed once rounded
        # the arrays' only owners (b widened where the device summed in float32, MPS), as they are handed over
        sums = DownSums(total, b.cpu().numpy().astype(np.float64, copy=False), h_first.cpu().numpy(),
                        b_first.cpu().numpy())
        del total, b, h_first, b_first
        return fit_down(w, sums)


FOLD_RUN = 256  # consecutive routed tokens that go to the same fold (neighbouring tokens are alike)
GRAM_BAND = 2048  # rows of H' whose product with a run is formed at once (117 MB at Mixtral 8x7B's 14336)
RIDGES = (0.01, 0.1, 1.0)  # lambda / mean(diag H') tried; 0.01 is GPTQ's dampening
RIDGE_ROWS = 512           # rows of down whose held-out error chooses the ridge


def ridge_rows(hidden: int) -> np.ndarray:
    """The seeded sample of RIDGE_ROWS of down's ``hidden`` rows whose held-out error chooses the ridge (all of
    them where there are fewer), in order."""
    if hidden <= RIDGE_ROWS:
        return np.arange(hidden)
    return np.sort(np.random.default_rng(0).choice(hidden, RIDGE_ROWS, replace=False))


def _row_bands(n: int) -> list[slice]:
    """The bands of GRAM_BAND rows an [n, n] sum is built and read in."""
    return [slice(top, min(top + GRAM_BAND, n)) for top in range(0, n, GRAM_BAND)]


@dataclass
class DownSums:
    """What fit_down works from: H' [F, F] and b = C^T W^T [F, H] summed over the expert's tokens (float64 sums,
    H' then rounded to the float32 the Hessian keeps), and over the first fold of them (float32; the second
    fold's are the differences), the first fold's b only at the rows of down that choose the ridge
    (ridge_rows). At Mixtral 8x7B's 14336 inputs they are 0.8 + 0.8 GB of H' and 0.5 + 0.03 GB of b, where
    both folds' float64 sums were 3.3 + 0.9 GB; fit_down consumes them (it drops them as it goes)."""
    h: np.ndarray | None
    b: np.ndarray | None
    h_first: np.ndarray | None
    b_first: np.ndarray | None  # [F, rows]: at ridge_rows of down only

    @classmethod
    def of_folds(cls, h: list[np.ndarray], b: list[np.ndarray]) -> DownSums:
        """From the two folds' sums."""
        return cls((h[0] + h[1]).astype(np.float32), b[0] + b[1], h[0].astype(np.float32),
                   b[0][:, ridge_rows(b[0].shape[1])].astype(np.float32))


@dataclass(frozen=True)
class DownTarget:
    weights: np.ndarray   # W' [H, F] float32
    hessian: Hessian      # H' [F, F] float32, damped by the fit's ridge (DAMP where W is kept), factored
    ridge: float | None   # the lambda of the fit; None: W itself held out better than every fit


def fit_down(w: np.ndarray, sums: DownSums) -> DownTarget:
    """Down's target and Hessian from W [H, F] and the sums of H' and b = C^T W^T, the ridge chosen on them
    (_held_out_ridge). The sums are consumed: the first fold's go after the choice, the float32 H' becomes the
    Hessian's, and the fit factors one float64 copy of it, so that at 14336 inputs the float32 H' and the
    factor (0.8 + 1.6 GB) are the most of it ever held at once.

    GPTQ and tuning then quantize W' on H' + lambda I, the matrix of the objective the fit minimises (the
    module's docstring), so the fit's factorization of it is GPTQ's too (gptq.DampedCholesky): the one
    factorization of the 14336-wide matrix an expert's down needs after the ridge's choice."""
    ridge = _held_out_ridge(w, sums)
    stored, rhs = np.asarray(sums.h, dtype=np.float32), sums.b
    sums.h = sums.b = sums.h_first = sums.b_first = None
    if ridge is None:
        return DownTarget(np.asarray(w, dtype=np.float32), Hessian(stored), None)
    # the float32 H' the Hessian holds is the one factored: its factor is the one Hessian(stored, ridge) computes
    cholesky = DampedCholesky(stored, ridge)
    rhs = np.asarray(rhs, dtype=np.float64)
    rhs += np.multiply(w.T, cholesky.lam, dtype=np.float64)
    target = cholesky.solve(rhs)
    del rhs
    dead = cholesky.dead[::-1]
    target[dead] = w.T[dead]  # columns no token reached: only the ridge speaks (the factor's diagonal is 1 there)
    weights = target.T.astype(np.float32)
    del target
    return DownTarget(weights, Hessian(stored, ridge, cholesky), cholesky.lam)


def _ridge_fit(w: np.ndarray, h: np.ndarray, b: np.ndarray, ridge: float, dtype=np.float64) -> np.ndarray:
    """(W C + lambda W) (H' + lambda I)^-1 [H, F], with b = C^T W^T [F, H] and lambda = ridge * mean(diag H'),
    factored and solved in ``dtype`` by LAPACK's potrf and potrs on one copy of H' (H' and b are left as they
    were): the held-out choice's fits on a fold (fit_down factors the total once, gptq.DampedCholesky)."""
    rhs = (b + ridge * mean_diagonal(h) * w.T).astype(dtype)
    h = damped(h, ridge, dtype)
    # H' is symmetric: its transpose, a view in the Fortran order LAPACK works in, is factored without a copy
    return cho_solve(cho_factor(h.T, lower=True, overwrite_a=True), rhs, overwrite_b=True).T


def _held_out_ridge(w: np.ndarray, sums: DownSums) -> float | None:
    """The RIDGES entry whose fit on the first fold leaves the least error on the second (a held-out fold), or
    None where W itself leaves less: with few tokens per input feature the fit learns the calibration's tokens
    rather than the quantized gate and up. The error of Q on a fold is tr(Q H Q^T) - 2 tr(Q b) plus a
    constant. Each row of the fit solves its own least squares with the same matrix, so the errors are
    summed over a seeded sample of RIDGE_ROWS rows (all of them where there are fewer): at Mixtral 8x7B's
    shapes this keeps the choice to three factorizations instead of 25 TFLOP of solves and products.
    Scoring each fold's fits on the other as well (two-fold cross-validation) would halve the variance of the
    errors compared at twice the cost (three more 14336-wide factorizations, a tenth of an expert's time);
    where the ridges' errors are far enough apart to matter the one fold tells them apart, and where they
    are not, the fits they give hold out alike. The factorizations are float32 (LAPACK's spotrf: twice
    dpotrf's speed, in half its memory; float64 where float32's is not positive definite): a choice
    float32's rounding could change is one between ridges whose fits hold out alike, and the fit itself is
    float64. The second fold's H' (the total less the first's, widened) is formed a band of rows at a time,
    once, for every candidate's error together."""
    h, h_first = sums.h, sums.h_first
    first_trace = float(np.trace(h_first, dtype=np.float64))
    if min(first_trace, float(np.trace(h, dtype=np.float64)) - first_trace) <= 0:
        return None
    rows = ridge_rows(len(w))
    w, b_first = np.asarray(w[rows], dtype=np.float64), sums.b_first
    b_second = sums.b[:, rows] - b_first

    def fit(ridge: float) -> np.ndarray:
        try:
            return _ridge_fit(w, h_first, b_first, ridge, np.float32).astype(np.float64)
        except np.linalg.LinAlgError:
            return _ridge_fit(w, h_first, b_first, ridge)

    candidates = [w, *(fit(ridge) for ridge in RIDGES)]
    q = np.concatenate(candidates)  # [candidates x rows, F]
    # tr(Q H Q^T) of each candidate on the second fold, H a band of rows at a time (it is symmetric)
    quadratic = np.zeros(len(q))
    for band in _row_bands(len(h)):
        quadratic += np.sum((q @ (h[band].astype(np.float64) - h_first[band]).T) * q[:, band], axis=1)
    errors = [float(np.sum(part)) - 2 * float(np.sum(c * b_second.T))
              for part, c in zip(np.split(quadratic, len(candidates)), candidates)]
    best, best_error = None, errors[0]
    for ridge, error in zip(RIDGES, errors[1:]):
        if error < best_error:
            best, best_error = ridge, error
    return best
