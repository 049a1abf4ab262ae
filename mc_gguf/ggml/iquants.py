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


GROUP = 8  # the weights one lattice code stands for (a grid point of IQ1_S, IQ2_XXS, IQ2_XS)


def _ksigns() -> np.ndarray:
    """ggml's ksigns_iq2xs [128, 8] as +-1: sign index i stands for its 7 bits and an 8th that makes the
    number of minus signs even."""
    i = np.arange(128)
    bits = (i[:, None] >> np.arange(7)) & 1
    mask = np.concatenate([bits, bits.sum(1, keepdims=True) & 1], axis=1)
    return np.where(mask == 1, -1.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class Lattice:
    """Where an i-quant keeps its lattice codes, each group of GROUP weights one point of ggml's grid
    (gguf-py's tables of iq2xxs_grid, iq2xs_grid, iq1s_grid): for IQ2_XXS and IQ2_XS a grid index of
    magnitudes (8, 25, 43) and a sign index into ksigns_iq2xs; for IQ1_S an 11-bit index of values in
    {-1, 0, 1}, to which the sub-block's delta (+-IQ1S_DELTA, its own bit) is added. ``v`` below is what
    unpack reads: a group's grid values times its signs, or plus its delta."""
    name: str
    signed: bool

    @property
    def grid(self) -> np.ndarray:
        return _grid(self.name)

    @property
    def a(self) -> float:
        """The type's a in m(ls) = a * (ls + c): the tuning's codes are q = a v."""
        return FORMATS[self.name].a

    def points(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(grid index, sign index or delta) [..., groups] of the values ``v`` [..., groups * GROUP]."""
        v = np.asarray(v, dtype=np.float64).reshape(*v.shape[:-1], -1, GROUP)
        if self.signed:
            magnitude, minus = np.abs(v), v < 0
            if np.any(minus.sum(-1) % 2):
                raise ValueError(f"{self.name}: a group with an odd number of minus signs (ksigns_iq2xs has none)")
            other = (minus[..., :7] * (1 << np.arange(7))).sum(-1)
        else:
            magnitude = np.rint(v)
            other = (v - magnitude).mean(-1)
        index = _grid_index(self.name)
        keys = _keys(magnitude)
        found = np.searchsorted(index[0], keys)
        found = np.minimum(found, len(index[0]) - 1)
        if not np.array_equal(index[0][found], keys):
            raise ValueError(f"{self.name}: values that are no point of ggml's grid")
        return index[1][found], other

    def families(self, v):
        """The points a group can move to in one step, as families (P [K, GROUP], P (x) P [K, GROUP^2],
        m [rows, GROUP] or None, o [rows] or None) of the points P_k * m + o (m None: 1; o None: 0), for the
        groups ``v`` [rows, GROUP] (torch): any grid point with the group's signs (or delta) kept, and, for
        signed grids, the group's magnitudes with any of the 128 sign patterns."""
        import torch

        grid, signs = self.tables(v.dtype, v.device)
        if not self.signed:
            return [(*grid, None, (v - torch.round(v)).mean(-1))]
        return [(*grid, torch.sign(v), None), (*signs, torch.abs(v), None)]

    def tables(self, dtype, device):
        """((the grid, its products P (x) P), (ksigns_iq2xs as +-1, theirs)) as torch tensors, made once per
        dtype and device."""
        import torch

        key = (self.name, dtype, device)
        if key not in _TABLES:
            def with_pairs(points: np.ndarray) -> tuple:
                t = torch.as_tensor(points, dtype=dtype, device=device)
                return t, (t[:, :, None] * t[:, None, :]).reshape(len(t), -1)

            _TABLES[key] = (with_pairs(self.grid), with_pairs(_ksigns()))
        return _TABLES[key]

    def write(self, data: np.ndarray, v: np.ndarray) -> np.ndarray:
        """``data`` [n, type_size] with the codes of the values ``v`` [n, 256] written in, every other bit kept:
        the layouts of ggml-common.h's block_iq2_xs, block_iq2_xxs and block_iq1_s, as ggml-quants.c's
        dequantize_row_iq2_xs, _iq2_xxs and _iq1_s read them."""
        out = data.copy()
        index, other = self.points(v)           # [n, 32] each
        if self.name == "IQ2_XS":                # qs[32] uint16 after d: grid index | sign index << 9
            qs = (index | (other << 9)).astype(np.uint16)
            out[:, 2:66] = qs.view(np.uint8).reshape(len(out), 64)
        elif self.name == "IQ2_XXS":             # per sub-block of 32: 4 grid bytes, then 4 x 7 sign bits | ls << 28
            for ib in range(8):
                at = 2 + 8 * ib
                out[:, at:at + 4] = index[:, 4 * ib:4 * ib + 4].astype(np.uint8)
                word = out[:, at + 4:at + 8].copy().view(np.uint32).reshape(-1)
                signs = sum(other[:, 4 * ib + k].astype(np.uint32) << np.uint32(7 * k) for k in range(4))
                word = (word & np.uint32(0xF0000000)) | signs
                out[:, at + 4:at + 8] = word.view(np.uint8).reshape(len(out), 4)
        else:                                    # IQ1_S: qs[32] the low 8 bits; qh[ib] bits 3k..3k+2 the high 3
            out[:, 2:34] = (index & 0xFF).astype(np.uint8)
            qh = out[:, 34:50].copy().view(np.uint16).reshape(len(out), 8).astype(np.uint32)
            stored = np.where(qh & 0x8000, -1.0, 1.0)[:, :, None] * np.abs(other).reshape(len(out), 8, 4)
            if not np.allclose(other.reshape(len(out), 8, 4), stored):
                raise ValueError("IQ1_S: a delta other than its sub-block's (the delta's bit is not moved)")
            high = (index >> 8).reshape(len(out), 8, 4)
            qh = (qh & 0xF000) | sum(high[:, :, k].astype(np.uint32) << (3 * k) for k in range(4))
            out[:, 34:50] = qh.astype(np.uint16).view(np.uint8).reshape(len(out), 16)
        return out


_TABLES: dict = {}
LATTICES = {name: Lattice(name, signed) for name, signed in (("IQ2_XXS", True), ("IQ2_XS", True),
                                                                 ("IQ1_S", False))}


def _grid(name: str) -> np.ndarray:
    import gguf.quants

    table = getattr(gguf.quants, name)
    table.init_grid()
    return np.asarray(table.grid, dtype=np.float32).reshape(-1, GROUP)


def _keys(points: np.ndarray) -> np.ndarray:
    """One integer per group of GROUP small integers (the grid's values), for a sorted lookup."""
    digits = np.rint(points).astype(np.int64) + 1          # -1..43 -> 0..44
    return (digits * (64 ** np.arange(GROUP))).sum(-1)


_INDEX: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _grid_index(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(sorted keys, the grid index of each) of ``name``'s grid."""
    if name not in _INDEX:
        keys = _keys(_grid(name))
        order = np.argsort(keys)
        _INDEX[name] = keys[order], order
    return _INDEX[name]


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
    """ggml's bytes [n, type_size] of ``blocks``: their codes' bytes with ``d`` and ``ls`` written in, and, for
    a lattice type, the codes of ``v`` (where the tuning moved them)."""
    data = blocks.data
    lattice = LATTICES.get(blocks.fmt.name)
    if lattice is not None:
        data = lattice.write(data, blocks.v)
    return _write(data, blocks.fmt, blocks.d, blocks.ls)
