"""ggml's i-quant blocks opened up as far as their scales: the fp16 ``d`` and each sub-block's integer scale.

An i-quant super-block of 256 weights holds an fp16 scale ``d``, a small
integer scale ``ls`` per sub-block, and codes: lattice points (with signs)
or, for IQ4_XS, indices into a non-uniform table. ggml's
``dequantize_row_iqX`` (ggml-quants.c) turns them into

    w = (d * m(ls)) * v      m(ls) = a * (ls + c)

with ``v`` what the codes stand for (grid value times sign, or the table's
value) and a, c per type: IQ2_XXS and IQ2_XS ``(0.5 + ls) * 0.25``, IQ3_XXS
``(0.5 + ls) * 0.5``, IQ1_S ``2 * ls + 1`` (with v = grid + delta), IQ4_XS
``ls - 32``. The codes stay as ggml's search chose them; ``unpack`` reads
``d``, ``ls`` and ``v`` (by ggml's own dequantization of a copy of the bytes
with d = 1 and every ls at a power-of-two multiplier), and ``pack`` writes a
new ``d`` and ``ls`` into the bytes, every other bit kept. Each weight is one
rounding of an exact product in float32, as in ggml, so ``values`` is what
ggml's ``to_float`` gives for ``pack(blocks)``. IQ1_M (whose ``d`` is spread
over its scales) is not opened.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mc_gguf.ggml.kquants import QK_K, SuperBlockFormat
from mc_gguf.ggml.types import TYPES


@dataclass(frozen=True)
class Field:
    """Bits [shift, shift + width) of the block's byte ``offset`` hold bits [at, at + width) of a value."""
    offset: int
    shift: int
    width: int
    at: int = 0


@dataclass(frozen=True)
class IFormat(SuperBlockFormat):
    """One i-quant type: where its sub-block scales are and what they multiply by."""
    scale_max: int          # ls in [0, scale_max]
    a: float                # m(ls) = a * (ls + c)
    c: float
    fields: tuple[tuple[Field, ...], ...]   # per sub-block, the bits of its ls
    unit_ls: int            # an ls whose m is a power of two (unpack reads v there)

    def multiplier(self, ls: np.ndarray) -> np.ndarray:
        return self.a * (ls + self.c)


def _nibbles(first: int, step: int, n: int, shift_of) -> tuple[tuple[Field, ...], ...]:
    return tuple((Field(first + step * k, shift_of(k), 4),) for k in range(n))


FORMATS: dict[str, IFormat] = {f.name: f for f in (
    # block_iq2_xxs: d, qs[32] uint16; sub-block k's ls is the top nibble of its second uint32 (byte 2 + 8k + 7)
    IFormat(TYPES["IQ2_XXS"], 32, 15, 0.25, 0.5, _nibbles(9, 8, 8, lambda k: 4), 0),
    # block_iq2_xs: d, qs[32] uint16, scales[8]: two 16-weight sub-blocks per byte, low nibble first
    IFormat(TYPES["IQ2_XS"], 16, 15, 0.25, 0.5, tuple((Field(66 + k // 2, 4 * (k % 2), 4),) for k in range(16)), 0),
    # block_iq3_xxs: d, qs[96]; the top nibble of the k-th uint32 after the 64 grid bytes (byte 2 + 64 + 4k + 3)
    IFormat(TYPES["IQ3_XXS"], 32, 15, 0.5, 0.5, _nibbles(69, 4, 8, lambda k: 4), 0),
    # block_iq1_s: d, qs[32], qh[8] uint16; bits 12-14 of qh[k] (bits 4-6 of byte 34 + 2k + 1)
    IFormat(TYPES["IQ1_S"], 32, 7, 2.0, 0.5, tuple((Field(35 + 2 * k, 4, 3),) for k in range(8)), 0),
    # block_iq4_xs: d, scales_h uint16, scales_l[4], qs[128]; ls = 4 bits of scales_l | 2 bits of scales_h << 4
    IFormat(TYPES["IQ4_XS"], 32, 63, 1.0, -32.0, tuple(
        (Field(4 + k // 2, 4 * (k % 2), 4), Field(2 + (2 * k) // 8, (2 * k) % 8, 2, at=4)) for k in range(8)), 33),
)}


@dataclass
class IBlocks:
    """The scales of ``n`` super-blocks of one i-quant type, with what their codes stand for."""
    fmt: IFormat
    d: np.ndarray       # [n] float32 holding fp16 values
    ls: np.ndarray      # [n, n_sub] int32 in [0, scale_max]
    v: np.ndarray       # [n, 256] float32, fixed
    data: np.ndarray    # [n, type_size] uint8, the bytes the codes are kept in

    def __post_init__(self) -> None:
        f = self.fmt
        if len(self.ls) and (self.ls.min() < 0 or self.ls.max() > f.scale_max):
            raise ValueError(f"{f.name} stores ls in [0, {f.scale_max}]; got [{self.ls.min()}, {self.ls.max()}]")
        if not np.array_equal(self.d, self.d.astype(np.float16).astype(np.float32)):
            raise ValueError(f"{f.name} stores d as fp16; round it first")


def values(blocks: IBlocks) -> np.ndarray:
    """The float32 weights [n, 256] ggml dequantizes ``pack(blocks)`` to: (d * m(ls)) * v, one rounding."""
    f = blocks.fmt
    step = blocks.d.astype(np.float64)[:, None] * f.multiplier(blocks.ls.astype(np.float64))
    return (np.repeat(step, f.sub_block, axis=1) * blocks.v).astype(np.float32)


def _read(data: np.ndarray, f: IFormat) -> np.ndarray:
    ls = np.zeros((len(data), f.n_sub), dtype=np.int32)
    for k, fields in enumerate(f.fields):
        for field in fields:
            bits = (data[:, field.offset].astype(np.int32) >> field.shift) & ((1 << field.width) - 1)
            ls[:, k] |= bits << field.at
    return ls


def _write(data: np.ndarray, f: IFormat, d: np.ndarray, ls: np.ndarray) -> np.ndarray:
    out = data.copy()
    out[:, 0:2] = np.ascontiguousarray(d.astype(np.float16)).view(np.uint8).reshape(len(d), 2)
    for k, fields in enumerate(f.fields):
        for field in fields:
            mask = ((1 << field.width) - 1) << field.shift
            bits = ((ls[:, k] >> field.at) & ((1 << field.width) - 1)) << field.shift
            out[:, field.offset] = (out[:, field.offset] & (0xFF ^ mask)) | bits.astype(np.uint8)
    return out


def unpack(data: np.ndarray, name: str) -> IBlocks:
    """ggml's bytes (any shape holding whole blocks) -> every super-block's d, ls and code values, in order."""
    import gguf

    from mc_gguf.ggml import quants

    f = FORMATS[name]
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, f.type_size)
    d = np.ascontiguousarray(b[:, 0:2]).view(np.float16).reshape(-1).astype(np.float32)
    ls = _read(b, f)
    unit = np.full_like(ls, f.unit_ls)
    probe = _write(b, f, np.ones(len(b), np.float32), unit)  # v * m(unit_ls), exact
    v = quants.dequantize(probe, gguf.GGMLQuantizationType(f.ggml_type), QK_K).reshape(len(b), QK_K) / np.float32(f.multiplier(f.unit_ls))
    return IBlocks(f, d, ls, v.astype(np.float32), b)


def pack(blocks: IBlocks) -> np.ndarray:
    """ggml's bytes [n, type_size] of ``blocks``: their codes' bytes with ``d`` and ``ls`` written in."""
    return _write(blocks.data, blocks.fmt, blocks.d, blocks.ls)
