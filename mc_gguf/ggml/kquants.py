"""ggml's K-quant blocks opened up: the integers inside each 256-weight super-block, and back to ggml's bytes.

A K-quant super-block of 256 weights holds an fp16 scale ``d`` (and for the
types with minimums an fp16 ``dmin``), one small integer scale (and minimum)
per sub-block, and one small integer ``q`` per weight. ggml's
``dequantize_row_qX_K`` (ggml-quants.c) turns them into

    w = (d * scale_j) * q - (dmin * min_j)     Q2_K, Q4_K, Q5_K
    w = (d * scale_j) * q                      Q3_K, Q6_K (signed scales and q)

``unpack`` reads ggml's bytes into these integers, ``pack`` writes them back
bit for bit as ``quantize_row_qX_K_ref`` lays them out (``block_qX_K`` in
ggml-common.h), and ``values`` evaluates the formula above in float32 in
ggml's order of operations, so ``values(blocks)`` is what ggml's ``to_float``
gives for ``pack(blocks)``. The quantizer that tunes these integers
(quantize/tune.py) therefore writes exactly the weights it tuned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mc_gguf.ggml.types import QK_K, TYPES, QuantType


@dataclass(frozen=True)
class SuperBlockFormat:
    """A ggml type of 256-weight super-blocks, each with one scale per sub-block: the type's record
    (types.py: its id and bytes per block) and how its block is laid out inside."""
    type: QuantType
    sub_block: int     # weights per scale

    def __post_init__(self) -> None:
        assert self.type.block_size == QK_K, f"{self.type.name} is not a type of {QK_K}-weight super-blocks"

    @property
    def name(self) -> str:
        return self.type.name

    @property
    def ggml_type(self) -> int:
        return self.type.ggml_type

    @property
    def type_size(self) -> int:
        """bytes per super-block (sizeof(block_X))"""
        return self.type.type_size

    @property
    def n_sub(self) -> int:
        return QK_K // self.sub_block


@dataclass(frozen=True)
class KFormat(SuperBlockFormat):
    """One K-quant type: the integer ranges block_qX_K stores."""
    q_min: int         # the range of q as dequantize_row_qX_K uses it
    q_max: int
    scale_min: int     # the range of the sub-block scales as it uses them
    scale_max: int
    min_max: int = 0   # the sub-block minimums' upper bound; 0: the type has no minimums

    @property
    def has_min(self) -> bool:
        return self.min_max > 0


FORMATS: dict[str, KFormat] = {f.name: f for f in (
    KFormat(TYPES["Q2_K"], 16, 0, 3, 0, 15, min_max=15),
    KFormat(TYPES["Q3_K"], 16, -4, 3, -32, 31),
    KFormat(TYPES["Q4_K"], 32, 0, 15, 0, 63, min_max=63),
    KFormat(TYPES["Q5_K"], 32, 0, 31, 0, 63, min_max=63),
    KFormat(TYPES["Q6_K"], 16, -32, 31, -128, 127),
)}


@dataclass
class KBlocks:
    """The integers of ``n`` super-blocks of one K-quant type."""
    fmt: KFormat
    d: np.ndarray               # [n] float32 holding fp16 values
    scales: np.ndarray          # [n, n_sub] int32, the signed values dequantization multiplies by
    q: np.ndarray               # [n, 256] int32, signed as dequantization uses them
    dmin: np.ndarray | None = None   # [n] float32 holding fp16 values (types with minimums)
    mins: np.ndarray | None = None   # [n, n_sub] int32

    def __post_init__(self) -> None:
        f = self.fmt
        for name, values, low, high in (("q", self.q, f.q_min, f.q_max),
                                        ("scales", self.scales, f.scale_min, f.scale_max),
                                        ("mins", self.mins, 0, f.min_max)):
            if values is not None and len(values) and (values.min() < low or values.max() > high):
                raise ValueError(f"{f.name} stores {name} in [{low}, {high}]; got [{values.min()}, {values.max()}]")
        for name, values in (("d", self.d), ("dmin", self.dmin)):
            if values is not None and not np.array_equal(values, values.astype(np.float16).astype(np.float32)):
                raise ValueError(f"{f.name} stores {name} as fp16; round it first")


def values(blocks: KBlocks) -> np.ndarray:
    """The float32 weights [n, 256] ggml dequantizes ``pack(blocks)`` to, in dequantize_row_qX_K's order."""
    f = blocks.fmt
    n = len(blocks.d)
    step = (blocks.d[:, None] * blocks.scales.astype(np.float32)).reshape(n, f.n_sub, 1)
    q = blocks.q.astype(np.float32).reshape(n, f.n_sub, f.sub_block)
    w = step * q
    if f.has_min:
        w = w - (blocks.dmin[:, None] * blocks.mins.astype(np.float32)).reshape(n, f.n_sub, 1)
    return w.reshape(n, QK_K).astype(np.float32)


def _bits_to_bytes(v: np.ndarray, groups: int, bits: int) -> np.ndarray:
    """Values [n, G*S*L] < 2**bits -> bytes [n, G*L]: byte (g, l) holds value (g, s, l) at bit bits*s."""
    n = v.shape[0]
    per_byte = 8 // bits
    v = v.astype(np.uint8).reshape(n, groups, per_byte, -1)
    out = np.zeros((n, groups, v.shape[-1]), dtype=np.uint8)
    for s in range(per_byte):
        out |= v[:, :, s] << np.uint8(bits * s)
    return out.reshape(n, -1)


def _bytes_to_bits(b: np.ndarray, groups: int, bits: int) -> np.ndarray:
    """The inverse of _bits_to_bytes: bytes [n, G*L] -> values [n, G*S*L]."""
    n = b.shape[0]
    per_byte = 8 // bits
    b = b.reshape(n, groups, 1, -1)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).reshape(1, 1, per_byte, 1)
    return ((b >> shifts) & np.uint8((1 << bits) - 1)).reshape(n, -1).astype(np.int32)


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8).reshape(len(x), 2)


def _fp16_values(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).reshape(-1).astype(np.float32)


def _pack_scale_min_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and minimums (get_scale_min_k4 in ggml-quants.c, inverted)."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    low = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    high = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return np.concatenate([low, mid, high], axis=1)


def _unpack_scale_min_k4(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    low, mid, high = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = np.concatenate([low & 0x3F, (high & 0xF) | ((low >> 2) & 0x30)], axis=1)
    mn = np.concatenate([mid & 0x3F, (high >> 4) | ((mid >> 2) & 0x30)], axis=1)
    return sc.astype(np.int32), mn.astype(np.int32)


def _pack_q3_scales(s: np.ndarray) -> np.ndarray:
    """Q3_K's 12 bytes of sixteen 6-bit scales stored +32 (quantize_row_q3_K_ref)."""
    u = (s + 32).astype(np.uint8)
    low = (u[:, :8] & 0xF) | ((u[:, 8:] & 0xF) << 4)
    high = np.zeros((len(u), 4), dtype=np.uint8)
    for part in range(4):
        high |= (u[:, 4 * part:4 * part + 4] >> 4) << np.uint8(2 * part)
    return np.concatenate([low, high], axis=1)


def _unpack_q3_scales(b: np.ndarray) -> np.ndarray:
    low = np.concatenate([b[:, :8] & 0xF, b[:, :8] >> 4], axis=1)
    high = np.concatenate([(b[:, 8:12] >> np.uint8(2 * part)) & 3 for part in range(4)], axis=1)
    return (low | (high << 4)).astype(np.int32) - 32


def pack(blocks: KBlocks) -> np.ndarray:
    """ggml's bytes [n, type_size] of ``blocks`` (block_qX_K in ggml-common.h)."""
    f, q, n = blocks.fmt, blocks.q, len(blocks.d)
    if f.name == "Q2_K":       # scales[16] (scale | min << 4), qs[64], d, dmin
        parts = [(blocks.scales | (blocks.mins << 4)).astype(np.uint8), _bits_to_bytes(q, 2, 2),
                 _fp16_bytes(blocks.d), _fp16_bytes(blocks.dmin)]
    elif f.name == "Q3_K":     # hmask[32], qs[64], scales[12], d; q + 4 = low 2 bits | high bit << 2
        u = q + 4
        parts = [_bits_to_bytes(u >> 2, 1, 1), _bits_to_bytes(u & 3, 2, 2), _pack_q3_scales(blocks.scales),
                 _fp16_bytes(blocks.d)]
    elif f.name == "Q4_K":     # d, dmin, scales[12], qs[128]
        parts = [_fp16_bytes(blocks.d), _fp16_bytes(blocks.dmin), _pack_scale_min_k4(blocks.scales, blocks.mins),
                 _bits_to_bytes(q, 4, 4)]
    elif f.name == "Q5_K":     # d, dmin, scales[12], qh[32], qs[128]
        parts = [_fp16_bytes(blocks.d), _fp16_bytes(blocks.dmin), _pack_scale_min_k4(blocks.scales, blocks.mins),
                 _bits_to_bytes(q >> 4, 1, 1), _bits_to_bytes(q & 0xF, 4, 4)]
    else:                      # Q6_K: ql[128], qh[64], scales[16] (int8), d; q + 32 = ql | qh << 4
        u = q + 32
        parts = [_bits_to_bytes(u & 0xF, 2, 4), _bits_to_bytes(u >> 4, 2, 2),
                 blocks.scales.astype(np.int8).view(np.uint8), _fp16_bytes(blocks.d)]
    out = np.concatenate(parts, axis=1)
    assert out.shape == (n, f.type_size)
    return out


def unpack(data: np.ndarray, name: str) -> KBlocks:
    """ggml's bytes (any shape holding whole blocks) -> the integers of every super-block, in order."""
    f = FORMATS[name]
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, f.type_size)

    def take(*sizes: int) -> list[np.ndarray]:
        edges = np.cumsum(sizes)[:-1]
        return np.split(b, edges, axis=1)

    if f.name == "Q2_K":
        scales, qs, d, dmin = take(16, 64, 2, 2)
        return KBlocks(f, _fp16_values(d), (scales & 0xF).astype(np.int32), _bytes_to_bits(qs, 2, 2),
                       _fp16_values(dmin), (scales >> 4).astype(np.int32))
    if f.name == "Q3_K":
        hmask, qs, scales, d = take(32, 64, 12, 2)
        q = _bytes_to_bits(qs, 2, 2) | (_bytes_to_bits(hmask, 1, 1) << 2)
        return KBlocks(f, _fp16_values(d), _unpack_q3_scales(scales), q - 4)
    if f.name in ("Q4_K", "Q5_K"):
        sizes = (2, 2, 12, 128) if f.name == "Q4_K" else (2, 2, 12, 32, 128)
        d, dmin, scales, *qparts = take(*sizes)
        q = _bytes_to_bits(qparts[-1], 4, 4)
        if f.name == "Q5_K":
            q = q | (_bytes_to_bits(qparts[0], 1, 1) << 4)
        sc, mn = _unpack_scale_min_k4(scales)
        return KBlocks(f, _fp16_values(d), sc, q, _fp16_values(dmin), mn)
    ql, qh, scales, d = take(128, 64, 16, 2)
    q = _bytes_to_bits(ql, 2, 4) | (_bytes_to_bits(qh, 2, 2) << 4)
    return KBlocks(f, _fp16_values(d), scales.view(np.int8).astype(np.int32), q - 32)
