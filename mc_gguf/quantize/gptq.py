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

import gguf
import numpy as np
from scipy.linalg import lapack, solve_triangular

from mc_gguf.ggml import quants

BLOCK = 256
DAMP = 0.01


def inverse_hessian_factor(hessian: np.ndarray, damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
    """(U, dead): U upper triangular with U^T U = (H + damp * mean(diag H) * I)^-1; dead marks
    input columns no calibration token ever made non-zero.

    In place in one float64 copy of H (1.6 GB for the down projection of Mixtral 8x7B, whose inputs are
    14336 wide), by LAPACK: H = L L^T (potrf), H^-1 from L (potri), H^-1 = L2 L2^T (potrf), U = L2^T, as
    GPTQ's cholesky, cholesky_inverse, cholesky(upper) does it; H^-1 is never formed beside H.
    """
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    # H is symmetric, so its transpose (a view in Fortran order, as LAPACK works) is H; LAPACK's lower
    # triangle of it is the upper triangle of h
    a = h.T
    for step, (routine, name) in enumerate(((lapack.dpotrf, "a"), (lapack.dpotri, "c"), (lapack.dpotrf, "a"))):
        result, info = routine(a, lower=1, **{f"overwrite_{name}": 1})
        if info != 0:
            raise np.linalg.LinAlgError(f"the damped Hessian is not positive definite ({routine.__name__}: {info})")
        assert result is a or np.shares_memory(result, a), "LAPACK worked on a copy"
    for row in range(1, len(h)):
        h[row, :row] = 0.0  # the stale lower triangle of h (LAPACK's upper); U is h's upper triangle
    return h, dead


def gptq_quantize(weights: np.ndarray, hessian: np.ndarray, qtype: gguf.GGMLQuantizationType,
                  imatrix: np.ndarray | None = None, damp: float = DAMP) -> np.ndarray:
    """ggml's bytes [rows, row_bytes] of ``weights`` [rows, cols] quantized with GPTQ error compensation."""
    rows, cols = weights.shape
    # the unit of compensation: a 256-column super-block, or the type's own block on rows that are not
    # whole super-blocks (stored in a 32-block fallback type); F16 rounds each weight alone
    block_size = BLOCK if cols % BLOCK == 0 else gguf.GGML_QUANT_SIZES[qtype][0]
    if cols % block_size:
        raise ValueError(f"{qtype.name} stores rows of whole {block_size}-weight blocks; these rows have {cols}")
    if block_size == 1:
        return quants.quantize(weights, qtype, imatrix)
    u, dead = inverse_hessian_factor(hessian, damp)
    w = np.array(weights, dtype=np.float64)
    w[:, dead] = 0.0
    chunks = []
    for first in range(0, cols, block_size):
        block = slice(first, first + block_size)
        q = quants.quantize(w[:, block].astype(np.float32), qtype,
                                None if imatrix is None else imatrix[block])
        chunks.append(q)
        rest = slice(first + block_size, cols)
        if first + block_size < cols:
            error = w[:, block] - quants.dequantize(q, qtype, block_size)
            # error @ U_BB^-1, by a triangular solve: X U_BB = E  <=>  U_BB^T X^T = E^T
            scaled = solve_triangular(u[block, block], error.T, trans="T", lower=False).T
            w[:, rest] -= scaled @ u[block, rest]
    return np.concatenate(chunks, axis=1)
