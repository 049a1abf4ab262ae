"""ggml's own quantizers, called through ctypes from the libggml-base the runtime installs.

K-quants and i-quants are never re-implemented in Python: ``quantize`` calls
``ggml_quantize_chunk`` (ggml.c) and ``dequantize`` calls the type's
``to_float`` from ``ggml_get_type_traits``.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import gguf
import numpy as np

from mc_gguf.errors import RuntimeMissingError

_MIN_WEIGHTS_PER_THREAD = 1 << 16


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits in ggml.h
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)),
        ("from_float_ref", ctypes.c_void_p),
    ]


@cache
def _lib() -> ctypes.CDLL:
    from mc_gguf.runtime.build import installed_library_dir, loaded_library

    lib_dir = installed_library_dir()
    path = loaded_library(lib_dir, "ggml-base") if lib_dir else None  # the copy llama_cpp uses, not a second
    if path is None:
        raise RuntimeMissingError("libggml-base from llama_cpp is needed to quantize; run `mc-gguf runtime build`")
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    return lib


def requires_imatrix(qtype: gguf.GGMLQuantizationType) -> bool:
    return bool(_lib().ggml_quantize_requires_imatrix(int(qtype)))


def quantize(weights: np.ndarray, qtype: gguf.GGMLQuantizationType, imatrix: np.ndarray | None = None, *,
             threads: int | None = None) -> np.ndarray:
    """Rows of float32 weights [rows, n_per_row] -> ggml's bytes [rows, row_bytes] (uint8).

    ``imatrix`` [n_per_row] weights the rounding error of each column (llama.cpp's
    importance matrix: the mean of x^2 over the inputs the rows see). Rows are
    quantized on ``threads`` threads (default: every core); each row's bytes do
    not depend on how they are split.
    """
    data = np.ascontiguousarray(weights, dtype=np.float32)
    if data.ndim != 2:
        raise ValueError(f"expected a 2-D array of rows, got shape {data.shape}")
    rows, n_per_row = data.shape
    lib = _lib()
    block = lib.ggml_get_type_traits(int(qtype)).contents.blck_size
    if n_per_row % block:
        # ggml_quantize_chunk would abort the process (GGML_ASSERT in ggml-quants.c)
        raise ValueError(f"{qtype.name} stores rows of whole {block}-weight blocks; these rows have {n_per_row} "
                         "weights (types.stored_type gives the type llama-quantize falls back to)")
    if imatrix is None and lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise ValueError(f"{qtype.name} needs an importance matrix")
    imat = None
    if imatrix is not None:
        imat = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imat.shape != (n_per_row,):
            raise ValueError(f"imatrix has shape {imat.shape}, expected ({n_per_row},)")
    row_bytes = lib.ggml_row_size(int(qtype), n_per_row)
    out = np.empty((rows, row_bytes), dtype=np.uint8)
    imat_ptr = imat.ctypes.data if imat is not None else None

    def quantize_rows(first: int, count: int) -> int:
        return lib.ggml_quantize_chunk(int(qtype), data[first:].ctypes.data, out[first:].ctypes.data, 0, count,
                                       n_per_row, imat_ptr)

    written = sum(_over_row_chunks(quantize_rows, rows, n_per_row, threads))
    if written != out.nbytes:
        raise AssertionError(f"ggml wrote {written} bytes for {qtype.name}, expected {out.nbytes}")
    return out


def dequantize(data: np.ndarray, qtype: gguf.GGMLQuantizationType, n_per_row: int, *,
               threads: int | None = None) -> np.ndarray:
    """ggml's bytes -> float32 rows [rows, n_per_row], by the type's own ``to_float`` (ggml_get_type_traits).

    The same numbers as gguf-py's numpy dequantization (a test checks every candidate type), many times faster.
    """
    lib = _lib()
    traits = lib.ggml_get_type_traits(int(qtype)).contents
    data = np.ascontiguousarray(data, dtype=np.uint8)
    row_bytes = lib.ggml_row_size(int(qtype), n_per_row)
    if data.size % row_bytes:
        raise ValueError(f"{data.size} bytes are not whole rows of {n_per_row} {qtype.name} weights")
    rows = data.size // row_bytes
    data = data.reshape(rows, row_bytes)
    out = np.empty((rows, n_per_row), dtype=np.float32)

    def dequantize_rows(first: int, count: int) -> None:
        traits.to_float(data[first:].ctypes.data, out[first:].ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                        count * n_per_row)

    list(_over_row_chunks(dequantize_rows, rows, n_per_row, threads))
    return out


def _over_row_chunks(work, rows: int, n_per_row: int, threads: int | None) -> list:
    """``work(first_row, count)`` over consecutive row chunks, on up to ``threads`` threads (default: every core).

    ggml_quantize_chunk and to_float are single-threaded and ctypes releases the GIL, so the rows are split
    over threads as llama-quantize splits them over its workers (llama_tensor_quantize_impl).
    """
    threads = threads or os.cpu_count() or 1
    n_chunks = max(1, min(threads, rows, rows * n_per_row // _MIN_WEIGHTS_PER_THREAD))
    bounds = np.linspace(0, rows, n_chunks + 1).astype(int)
    if n_chunks == 1:
        return [work(0, rows)]
    with ThreadPoolExecutor(n_chunks) as pool:
        return list(pool.map(work, bounds[:-1], np.diff(bounds)))
