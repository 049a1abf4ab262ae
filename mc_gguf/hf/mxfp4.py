"""MXFP4 experts, as the Hub's gpt-oss checkpoints store them, decoded exactly.

A stacked expert tensor ``{name}`` [E, in, out] is stored as ``{name}_blocks`` [E, out, in / 32, 16] uint8
and ``{name}_scales`` [E, out, in / 32] uint8. MXFP4 (OCP microscaling): blocks of 32 FP4 (E2M1) values, two
per byte (the low nibble first), sharing one E8M0 scale 2^(s - 127); the values of the 16 codes are read as
transformers' integrations/mxfp4.py and ggml's kvalues_mxfp4 (doubled there, the scale halved) read them.
"""

from __future__ import annotations

from collections.abc import Collection

MXFP4_BLOCK = 32
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
PARTS = ("blocks", "scales")  # the suffixes of a stacked tensor's two stored halves, ``{name}_blocks``


def stored_as_mxfp4(tensors: Collection[str], stacked: str) -> bool:
    """Is a stacked expert tensor stored as MXFP4 blocks and scales rather than under its own name?"""
    return stacked not in tensors and f"{stacked}_blocks" in tensors


def unquantized_shape(blocks: tuple[int, ...], scales: tuple[int, ...],
                      n_experts: int) -> tuple[int, int, int] | None:
    """The stacked tensor's [E, in, out] that MXFP4 blocks and scales of these shapes hold, None where they are not
    [n_experts, out, blocks, 16] and [n_experts, out, blocks]."""
    if len(blocks) != 4 or blocks[0] != n_experts or blocks[3] != MXFP4_BLOCK // 2 or scales != blocks[:3]:
        return None
    return n_experts, blocks[2] * MXFP4_BLOCK, blocks[1]


def mxfp4_dequantize(blocks, scales):
    """MXFP4 rows [rows, n_blocks, 16] uint8 with their scales [rows, n_blocks] as bfloat16 [rows, n_blocks * 32]:
    exact (an FP4 value has at most 2 significant bits, its scale is a power of two within bfloat16's exponent
    range) at half the memory of float32."""
    import torch

    lut = torch.tensor(FP4_E2M1, dtype=torch.float32)
    values = torch.stack((lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]), dim=-1)  # [rows, n, 16, 2]
    values = torch.ldexp(values.reshape(*blocks.shape[:2], MXFP4_BLOCK), scales.to(torch.int32)[..., None] - 127)
    return values.reshape(blocks.shape[0], -1).to(torch.bfloat16)
