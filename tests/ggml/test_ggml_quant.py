"""ggml's quantizers through ctypes: byte counts match the registry, and gguf-py decodes what ggml wrote."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from mc_gguf.ggml.quants import dequantize, quantize, requires_imatrix
from mc_gguf.ggml.types import CANDIDATES, TYPES, quant_type, stored_type

ROWS, N_PER_ROW = 16, 512


@pytest.fixture(scope="module")
def weights():
    return np.random.default_rng(7).standard_normal((ROWS, N_PER_ROW)).astype(np.float32)


@pytest.mark.parametrize("name", list(TYPES))
def test_bits_per_weight_equal_the_bytes_ggml_writes(weights, name):
    qt = TYPES[name]
    data = quantize(weights, qt.qtype, np.ones(N_PER_ROW, np.float32))
    assert data.nbytes * 8 / weights.size == pytest.approx(qt.bits_per_weight)


@pytest.mark.parametrize("name", list(TYPES))
def test_imatrix_requirement_matches_ggml(name):
    assert TYPES[name].needs_imatrix == requires_imatrix(TYPES[name].qtype)


@pytest.mark.parametrize("name", list(TYPES))
def test_gguf_py_dequantizes_ggml_output_exactly(weights, name):
    qt = TYPES[name]
    data = quantize(weights, qt.qtype, np.ones(N_PER_ROW, np.float32))
    by_gguf_py = gguf.quants.dequantize(data, qt.qtype)
    by_ggml = dequantize(data, qt.qtype, N_PER_ROW)
    np.testing.assert_array_equal(by_gguf_py, by_ggml)


def test_error_falls_as_bits_rise(weights):
    imatrix = np.ones(N_PER_ROW, np.float32)
    errors = []
    for qt in sorted(CANDIDATES.values(), key=lambda q: q.bits_per_weight):
        restored = gguf.quants.dequantize(quantize(weights, qt.qtype, imatrix), qt.qtype)
        errors.append(float(np.mean((restored - weights) ** 2) / np.mean(weights ** 2)))
    assert errors[-1] < 1e-4  # Q8_0
    assert errors[0] > 0.1    # IQ1_S
    # allowing neighbours of nearly equal size to swap, the error falls with the bits
    assert all(b < 1.5 * a for a, b in zip(errors, errors[1:]))


def test_imatrix_steers_the_rounding(weights):
    """Columns with a larger importance are reproduced more accurately (Q2_K uses the imatrix).

    Important and unimportant columns alternate, so every quantization block holds both.
    """
    imatrix = np.ones(N_PER_ROW, np.float32)
    imatrix[::2] = 100.0
    restored = gguf.quants.dequantize(quantize(weights, gguf.GGMLQuantizationType.Q2_K, imatrix),
                                      gguf.GGMLQuantizationType.Q2_K)
    err = (restored - weights) ** 2
    assert err[:, ::2].mean() < 0.8 * err[:, 1::2].mean()


def test_types_that_need_an_imatrix_refuse_without_one(weights):
    with pytest.raises(ValueError, match="importance matrix"):
        quantize(weights, gguf.GGMLQuantizationType.IQ2_XXS)


@pytest.mark.parametrize("name", list(TYPES))
def test_registry_rows_are_gguf_pys_types_and_block_sizes(name):
    qt = TYPES[name]
    assert qt.qtype.name == name
    assert gguf.GGML_QUANT_SIZES[qt.qtype] == (qt.block_size, qt.type_size)


@pytest.mark.parametrize("name", ["IQ2_XS", "Q4_K", "Q8_0"])
def test_threads_write_the_bytes_one_thread_writes(name):
    """Rows split over threads (uneven chunks: 37 rows over 4 threads) give the single-threaded bytes and floats."""
    qt = CANDIDATES[name]
    n_per_row = 8192  # 37 rows of 8192: enough weights for 4 chunks (quants._MIN_WEIGHTS_PER_THREAD)
    weights = np.random.default_rng(5).standard_normal((37, n_per_row)).astype(np.float32)
    imatrix = np.random.default_rng(6).uniform(0.5, 2.0, n_per_row).astype(np.float32)
    one = quantize(weights, qt.qtype, imatrix, threads=1)
    np.testing.assert_array_equal(quantize(weights, qt.qtype, imatrix, threads=4), one)
    np.testing.assert_array_equal(dequantize(one, qt.qtype, n_per_row, threads=4),
                                  dequantize(one, qt.qtype, n_per_row, threads=1))


@pytest.mark.parametrize("name", list(TYPES))
def test_rows_that_are_not_whole_blocks_are_refused_not_aborted(name):
    """ggml_quantize_chunk asserts (and aborts the process) on such rows; the wrapper raises first."""
    qt = quant_type(name)
    if qt.block_size == 1:
        return
    with pytest.raises(ValueError, match="whole"):
        quantize(np.zeros((2, qt.block_size + 16), np.float32), qt.qtype, np.ones(qt.block_size + 16, np.float32))


@pytest.mark.parametrize("n_per_row", [256, 352, 200])
@pytest.mark.parametrize("name", list(CANDIDATES))
def test_stored_type_is_one_ggml_can_quantize(name, n_per_row):
    """Whatever is asked for, the stored type quantizes rows of that length, and is the asked type when it can."""
    stored = stored_type(name, n_per_row)
    assert n_per_row % stored.block_size == 0
    assert (stored.name == name) == (n_per_row % CANDIDATES[name].block_size == 0)
    rows = np.random.default_rng(1).standard_normal((4, n_per_row)).astype(np.float32)
    assert quantize(rows, stored.qtype, np.ones(n_per_row, np.float32)).shape[0] == 4
