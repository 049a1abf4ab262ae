"""iquants opens the scales of ggml's i-quant blocks: ggml's own bytes unpack and pack back bit for bit, and any
fp16 d and sub-block scales written in evaluate to exactly what ggml's to_float gives, the codes untouched."""

import numpy as np
import pytest

from mc_gguf.ggml import iquants
from mc_gguf.ggml.quants import dequantize, quantize
from mc_gguf.ggml.types import quant_type

I_TYPES = tuple(iquants.FORMATS)


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((16, 512)).astype(np.float32)
    w[3] *= 40.0                      # a row of large weights
    w[5, :256] = 0.0                  # an all-zero super-block
    return w, rng.uniform(0.1, 3.0, w.shape[1]).astype(np.float32)


@pytest.mark.parametrize("name", I_TYPES)
def test_formats_match_ggml_types(name):
    f, t = iquants.FORMATS[name], quant_type(name)
    assert (f.ggml_type, f.type_size) == (t.ggml_type, t.type_size)
    assert f.multiplier(f.unit_ls) in (0.125, 0.25, 1.0)  # a power of two: v is read exactly


@pytest.mark.parametrize("name", I_TYPES)
def test_ggml_bytes_round_trip_and_new_scales_evaluate_as_ggml(weights, name):
    w, imatrix = weights
    qtype = quant_type(name).qtype
    data = quantize(w, qtype, imatrix)
    blocks = iquants.unpack(data, name)
    np.testing.assert_array_equal(iquants.pack(blocks).reshape(data.shape), data)
    np.testing.assert_array_equal(iquants.values(blocks).reshape(w.shape), dequantize(data, qtype, w.shape[1]))

    rng = np.random.default_rng(3)
    f = blocks.fmt
    blocks.ls = rng.integers(0, f.scale_max + 1, blocks.ls.shape).astype(np.int32)
    blocks.ls[0] = [0, f.scale_max] * (f.n_sub // 2)  # both ends of the range
    blocks.d = (blocks.d * rng.uniform(-2, 2, len(blocks.d))).astype(np.float16).astype(np.float32)
    packed = iquants.pack(blocks)
    by_ggml = dequantize(packed, qtype, w.shape[1])
    np.testing.assert_array_equal(iquants.values(blocks).reshape(w.shape), by_ggml)
    assert np.array_equal(iquants.unpack(packed, name).ls, blocks.ls)
    # only the bits of d and the scales changed: the codes are ggml's
    changed = np.unpackbits(np.bitwise_xor(packed.reshape(-1, f.type_size), data.reshape(-1, f.type_size)), axis=1)
    scale_bits = np.zeros(f.type_size * 8, dtype=bool)
    scale_bits[:16] = True
    for fields in f.fields:
        for field in fields:
            for bit in range(field.shift, field.shift + field.width):
                scale_bits[field.offset * 8 + 7 - bit] = True  # unpackbits is most significant first
    assert changed[:, ~scale_bits].sum() == 0 and changed[:, scale_bits].sum() > 0


@pytest.mark.parametrize("name", tuple(iquants.LATTICES))
def test_moved_lattice_codes_pack_to_what_ggml_dequantizes(weights, name):
    """Groups moved to other points of the grid (iquants.Lattice.families) are written into ggml's bytes: ggml
    dequantizes them to exactly values(blocks), unpack reads the same points back, and the bits of d and the
    scales are untouched."""
    import torch

    w, imatrix = weights
    qtype = quant_type(name).qtype
    data = quantize(w, qtype, imatrix)
    blocks = iquants.unpack(data, name)
    lattice = iquants.LATTICES[name]
    rng = np.random.default_rng(5)
    v = blocks.v.copy()
    for block in range(len(v)):
        for first in range(0, 256, iquants.GROUP):
            group = slice(first, first + iquants.GROUP)
            points, _, m, o = lattice.families(torch.from_numpy(v[block, group].astype(np.float64))[None])[
                rng.integers(2 if lattice.signed else 1)]
            k = rng.integers(len(points))
            v[block, group] = (points[k] * (1 if m is None else m[0]) + (0 if o is None else o[0])).numpy()
    assert np.mean(v != blocks.v) > 0.3
    blocks.v = v.astype(np.float32)
    packed = iquants.pack(blocks)
    np.testing.assert_array_equal(iquants.values(blocks).reshape(w.shape), dequantize(packed, qtype, w.shape[1]))
    again = iquants.unpack(packed, name)
    np.testing.assert_array_equal(again.v, blocks.v)
    np.testing.assert_array_equal(again.ls, blocks.ls)
    np.testing.assert_array_equal(again.d, blocks.d)


@pytest.mark.parametrize("name", tuple(iquants.LATTICES))
def test_values_off_the_grid_are_refused(weights, name):
    w, imatrix = weights
    blocks = iquants.unpack(quantize(w, quant_type(name).qtype, imatrix), name)
    blocks.v[0, :8] = 7.0
    with pytest.raises(ValueError, match="no point of ggml's grid"):
        iquants.pack(blocks)
