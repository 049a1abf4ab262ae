"""GPTQ error compensation whose rounding step is ggml's own quantizer.

GPTQ (Frantar et al., 2022) quantizes a weight matrix W [rows, cols] column by
column and moves each column's rounding error onto the columns not yet
quantized, weighted by the inverse Hessian H^-1 of the layer inputs
(H = X^T X). ggml's K- and i-quants round a whole super-block of 256 columns
at once (scales are chosen per block), so here a block is the unit: quantize
the block B with ggml_quantize_chunk, then update the remaining columns R by
the block's error E_B = W_B - Q_B:

    W_R <- W_R - E_B U_BB^-1 U_BR,    with H^-1 = U^T U (U upper triangular)

which is the optimal (OBS) update for quantizing B jointly; with U the
Cholesky factor of the full H^-1, its rows from B on describe the inverse
Hessian of the columns still free, as in GPTQ's own lazy batch updates.
Dampening: H + 0.01 * mean(diag H) * I, as the MC authors use.
"""

from __future__ import annotations

from functools import cached_property

import gguf
import numpy as np
import torch
from scipy.linalg import lapack, solve_triangular

from mc_gguf.ggml import quants

BLOCK = 256
DAMP = 0.01


def inverse_hessian_factor(hessian: np.ndarray, damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
    """(U, dead): U upper triangular with U^T U = (H + damp * mean(diag H) * I)^-1; dead marks
    input columns no calibration token ever made non-zero.

    In one float64 copy of H (1.6 GB for the down projection of Mixtral 8x7B, whose inputs are 14336 wide),
    by two LAPACK calls on H in reversed order, R = J H J (J reverses the columns): R = L L^T (potrf) and
    L^-1 (trtri), so that U = J L^-1 J is upper triangular and U^T U = J L^-T L^-1 J = H^-1. GPTQ's own
    construction (cholesky, cholesky_inverse, cholesky upper) gives the same U at twice the cost; H^-1 is
    never formed. U is returned as a reversed view of the copy.
    """
    return DampedCholesky(hessian, damp).inverse_factor()


class DampedCholesky:
    """The Cholesky factor L of R = J (H + lambda I) J, lambda = damp * mean(diag H) (the diagonal of columns no
    token made non-zero set to 1 first), in a float64 copy of H in reversed order, C order, whose transpose
    (a view in the Fortran order LAPACK works in) holds L in its lower triangle. It solves the damped
    system (down's ridge fit, hessian.py) and then becomes GPTQ's inverse factor, in place: one
    factorization where the fit and GPTQ use the same damped matrix."""

    def __init__(self, hessian: np.ndarray, damp: float = DAMP):
        h = np.array(hessian[::-1, ::-1], dtype=np.float64)  # R, in C order
        self.dead = np.diag(h) == 0   # in R's (reversed) order
        h[self.dead, self.dead] = 1.0
        self.lam = damp * np.mean(np.diag(h))
        h[np.diag_indices_from(h)] += self.lam
        # R is symmetric, so its transpose (a view in Fortran order, as LAPACK works) is R; LAPACK's lower
        # triangle of it is the upper triangle of h
        self._h = h
        _lapack(lapack.dpotrf, h.T, "a")

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        """X [n, k] float64 with (H + lambda I) X = rhs [n, k] (the diagonal of dead columns 1 + lambda):
        H + lambda I = J L L^T J, so X = J L^-T L^-1 J rhs."""
        x, info = lapack.dpotrs(self._h.T, np.asarray(rhs[::-1], dtype=np.float64), lower=1, overwrite_b=1)
        if info != 0:
            raise ValueError(f"dpotrs: illegal argument {-info}")
        return x[::-1]

    def inverse_factor(self) -> tuple[np.ndarray, np.ndarray]:
        """inverse_hessian_factor's (U, dead), U a reversed view of the factor's array (L^-1 by trtri, in
        place): the factor solves no more after this."""
        h, self._h = self._h, None
        _lapack(lapack.dtrtri, h.T, "c")
        for row in range(1, len(h)):
            h[row, :row] = 0.0  # the stale lower triangle of h (LAPACK's upper); L^-1 is h's upper triangle, transposed
        # U[i, j] = L^-1[n-1-i, n-1-j] = h[n-1-j, n-1-i]
        return h.T[::-1, ::-1], self.dead[::-1]


def _lapack(routine, a: np.ndarray, name: str) -> None:
    """``routine`` on the Fortran-order array ``a`` in place (its lower triangle)."""
    result, info = routine(a, lower=1, **{f"overwrite_{name}": 1})
    if info != 0:
        raise np.linalg.LinAlgError(f"the damped Hessian is not positive definite ({routine.__name__}: {info})")
    assert result is a or np.shares_memory(result, a), "LAPACK worked on a copy"


def mean_diagonal(hessian: np.ndarray) -> float:
    """mean(diag H), the unit of the dampening, kept above 0 for an expert no token reached."""
    return max(float(np.mean(np.diag(hessian).astype(np.float64))), 1e-30)


def damped(hessian: np.ndarray, damp: float = DAMP, dtype=np.float64) -> np.ndarray:
    """H + damp * mean(diag H) * I, GPTQ's dampening, the matrix tuning and the down projection's fit minimise
    on (inverse_hessian_factor also sets the diagonal of never-activated columns to 1 before it, for GPTQ's
    inverse)."""
    h = np.array(hessian, dtype=dtype)
    h[np.diag_indices_from(h)] += damp * mean_diagonal(hessian)
    return h


class Hessian:
    """An input Hessian [n, n] and what GPTQ and tuning derive from it (the inverse factor, the damped matrix),
    each computed once, when first asked for, and shared by every type quantized on it: the tuned-error
    ratios quantize one (expert, projection) to ten types, and an expert's gate and up share one."""

    def __init__(self, matrix: np.ndarray, damp: float = DAMP, cholesky: DampedCholesky | None = None):
        """``cholesky``: the damped matrix's factor where it is at hand (down's fit made it): it becomes this
        Hessian's inverse factor, in place, instead of a factorization of its own."""
        self.matrix, self.damp = matrix, damp
        if cholesky is not None:
            self.factor = self._stored(*cholesky.inverse_factor())

    def release(self, *parts: str) -> None:
        """Forget ``parts`` ("factor", "matrix") of a Hessian that no later call uses, once its one call is done
        with them: at 14336 inputs each is 0.8 GB. The damped matrix, once made, stays."""
        for part in parts:
            if part == "matrix":
                self.matrix = None
            else:
                self.__dict__.pop(part, None)

    @classmethod
    def of(cls, hessian: np.ndarray | Hessian) -> Hessian:
        return hessian if isinstance(hessian, Hessian) else cls(hessian)

    @cached_property
    def factor(self) -> tuple[np.ndarray, np.ndarray]:
        """inverse_hessian_factor's (U, dead), U kept in float32 and C order (0.8 GB at 14336 inputs, where the
        float64 factor is 1.6 GB): GPTQ's updates are float32 products."""
        return self._stored(*inverse_hessian_factor(self.matrix, self.damp))

    @staticmethod
    def _stored(u: np.ndarray, dead: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.ascontiguousarray(u, dtype=np.float32), dead

    @cached_property
    def damped(self) -> np.ndarray:
        """H + damp * mean(diag H) * I in float32 (what the tuner keeps: 0.8 GB at 14336 inputs)."""
        return damped(self.matrix, self.damp, np.float32)


def gptq_quantize(weights: np.ndarray, hessian: np.ndarray | Hessian, qtype: gguf.GGMLQuantizationType,
                  imatrix: np.ndarray | None = None) -> np.ndarray:
    """ggml's bytes [rows, row_bytes] of ``weights`` [rows, cols] quantized with GPTQ error compensation
    (``hessian``'s factor computed once where it is a Hessian shared by several calls)."""
    rows, cols = weights.shape
    # the unit of compensation: a 256-column super-block, or the type's own block on rows that are not
    # whole super-blocks (stored in a 32-block fallback type); F16 rounds each weight alone
    block_size = BLOCK if cols % BLOCK == 0 else gguf.GGML_QUANT_SIZES[qtype][0]
    if cols % block_size:
        raise ValueError(f"{qtype.name} stores rows of whole {block_size}-weight blocks; these rows have {cols}")
    if block_size == 1:
        return quants.quantize(weights, qtype, imatrix)
    u, dead = Hessian.of(hessian).factor
    # the columns and the updates in float32, each update one in-place product (torch's: 2-3x numpy's on a
    # CPU); a block's own triangular solve in float64
    start = np.array(weights, dtype=np.float32)
    start[:, dead] = 0.0
    w, factor = torch.from_numpy(start), torch.from_numpy(u)   # Hessian.factor's U: float32, C order
    chunks = []
    for first in range(0, cols, block_size):
        block = slice(first, first + block_size)
        columns = w[:, block].numpy().copy()
        q = quants.quantize(columns, qtype, None if imatrix is None else imatrix[block])
        chunks.append(q)
        rest = slice(first + block_size, cols)
        if first + block_size < cols:
            error = (columns - quants.dequantize(q, qtype, block_size)).astype(np.float64)
            # error @ U_BB^-1, by a triangular solve: X U_BB = E  <=>  U_BB^T X^T = E^T
            scaled = solve_triangular(np.asarray(u[block, block], dtype=np.float64), error.T, trans="T", lower=False).T
            w[:, rest].addmm_(torch.from_numpy(scaled.astype(np.float32)), factor[block, rest], alpha=-1)
    return np.concatenate(chunks, axis=1)
