"""kquants opens ggml's K-quant blocks: ggml's own bytes unpack and pack back bit for bit, and the integers
evaluate to exactly what ggml's to_float gives."""

import numpy as np
import pytest

from mc_gguf.ggml import kquants
from mc_gguf.ggml.quants import dequantize, quantize
from mc_gguf.ggml.types import quant_type

K_TYPES = tuple(kquants.FORMATS)


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((24, 512)).astype(np.float32)
    w[3] *= 40.0                      # a row of large weights
    w[5, :256] = 0.0                  # an all-zero super-block
    w[6, 256:] = np.abs(w[6, 256:])   # a super-block of one sign
    return w


@pytest.mark.parametrize("name", K_TYPES)
def test_formats_match_ggml_types(name):
    f, t = kquants.FORMATS[name], quant_type(name)
    assert (f.ggml_type, f.type_size) == (t.ggml_type, t.type_size)


@pytest.mark.parametrize("name", K_TYPES)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_ggml_bytes_round_trip_and_evaluate_as_ggml(weights, name, with_imatrix):
    qtype = quant_type(name).qtype
    imatrix = np.random.default_rng(1).uniform(0.1, 3.0, weights.shape[1]).astype(np.float32) if with_imatrix else None
    data = quantize(weights, qtype, imatrix)
    blocks = kquants.unpack(data, name)
    np.testing.assert_array_equal(kquants.pack(blocks).reshape(data.shape), data)
    by_ggml = dequantize(data, qtype, weights.shape[1])
    np.testing.assert_array_equal(kquants.values(blocks).reshape(by_ggml.shape), by_ggml)


@pytest.mark.parametrize("name", K_TYPES)
def test_any_integers_in_range_pack_to_what_ggml_reads(name):
    """Integers ggml's own quantizer would never write (extremes of every range) still pack exactly."""
    f = kquants.FORMATS[name]
    rng = np.random.default_rng(3)
    n = 40

    def draw(low, high, shape):
        v = rng.integers(low, high + 1, shape).astype(np.int32)
        v.flat[0], v.flat[-1] = low, high
        return v

    d = rng.uniform(-0.1, 0.1, n).astype(np.float16).astype(np.float32)
    blocks = kquants.KBlocks(f, d, draw(f.scale_min, f.scale_max, (n, f.n_sub)), draw(f.q_min, f.q_max, (n, 256)),
                             np.abs(d)[::-1].copy() if f.has_min else None,
                             draw(0, f.min_max, (n, f.n_sub)) if f.has_min else None)
    data = kquants.pack(blocks)
    again = kquants.unpack(data, name)
    for field in ("d", "scales", "q", "dmin", "mins"):
        a, b = getattr(blocks, field), getattr(again, field)
        assert (a is None and b is None) or np.array_equal(a, b), field
    by_ggml = dequantize(data, quant_type(name).qtype, 256)
    np.testing.assert_array_equal(kquants.values(blocks), by_ggml)


def test_out_of_range_integers_are_refused():
    f = kquants.FORMATS["Q4_K"]
    ones = np.ones((1, f.n_sub), dtype=np.int32)
    with pytest.raises(ValueError, match=r"q in \[0, 15\]"):
        kquants.KBlocks(f, np.ones(1, np.float32), ones, np.full((1, 256), 16, np.int32), np.ones(1, np.float32),
                        ones)
    with pytest.raises(ValueError, match="fp16"):
        kquants.KBlocks(f, np.full(1, 0.1, np.float32), ones, np.zeros((1, 256), np.int32), np.ones(1, np.float32),
                        ones)
