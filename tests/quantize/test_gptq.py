"""GPTQ with ggml's quantizer as the rounding step lowers the layer output error."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from mc_gguf.ggml import quants
from mc_gguf.quantize.gptq import gptq_quantize

T = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def correlated_layer():
    """Inputs whose columns are strongly correlated (a far-from-diagonal Hessian) and a weight matrix."""
    rng = np.random.default_rng(7)
    n, cols, rows = 4096, 512, 96
    mixing = 0.3 * np.eye(cols) + rng.standard_normal((cols, 16)) @ rng.standard_normal((16, cols)) / 4
    x = (rng.standard_normal((n, cols)) @ mixing).astype(np.float32)
    w = (0.05 * rng.standard_normal((rows, cols))).astype(np.float32)
    hessian = x.T.astype(np.float64) @ x
    off_diagonal = np.abs(hessian - np.diag(np.diag(hessian))).sum() / np.abs(np.diag(hessian)).sum()
    assert off_diagonal > 10  # far from diagonal: what an imatrix (the diagonal) cannot see
    return x, w, hessian


def output_error(x, w, data, qtype) -> float:
    q = gguf.quants.dequantize(data, qtype).reshape(w.shape)
    return float(np.linalg.norm(x @ (w - q).T))


@pytest.mark.parametrize("qtype", [T.Q3_K, T.IQ2_XS, T.Q4_K])
def test_gptq_lowers_the_output_error_of_plain_imatrix_quantization(correlated_layer, qtype):
    x, w, hessian = correlated_layer
    imatrix = (x ** 2).mean(axis=0)
    plain = output_error(x, w, quants.quantize(w, qtype, imatrix), qtype)
    compensated = output_error(x, w, gptq_quantize(w, hessian, qtype, imatrix), qtype)
    assert compensated < 0.85 * plain


def test_gptq_output_is_ggml_bytes_of_the_right_size(correlated_layer):
    _, w, hessian = correlated_layer
    data = gptq_quantize(w, hessian, T.Q4_K)
    assert data.dtype == np.uint8 and data.shape == quants.quantize(w, T.Q4_K).shape


def test_unseen_input_columns_do_not_break_gptq(correlated_layer):
    x, w, hessian = correlated_layer
    h = hessian.copy()
    h[:, 5] = h[5, :] = 0.0  # a column no token ever activated
    data = gptq_quantize(w, h, T.Q4_K)
    assert np.isfinite(gguf.quants.dequantize(data, T.Q4_K)).all()


def test_inverse_hessian_factor_is_the_upper_cholesky_factor_of_the_damped_inverse(correlated_layer):
    """In place by LAPACK, it equals GPTQ's construction: cholesky(inverse(H + damp)), upper."""
    from mc_gguf.quantize.gptq import DAMP, inverse_hessian_factor

    _, _, hessian = correlated_layer
    h = hessian.copy()
    h[:, 7] = h[7, :] = 0.0
    u, dead = inverse_hessian_factor(h)
    damped = h.copy()
    damped[7, 7] = 1.0
    damped[np.diag_indices_from(damped)] += DAMP * np.mean(np.diag(damped))
    expected = np.linalg.cholesky(np.linalg.inv(damped)).T
    assert dead.nonzero()[0].tolist() == [7]
    np.testing.assert_array_equal(np.tril(u, -1), 0.0)
    np.testing.assert_allclose(u, expected, rtol=1e-7, atol=1e-10 * np.abs(expected).max())
