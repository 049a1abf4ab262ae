"""The GGUF quantization types mc-gguf allocates, described once.

Bits per weight come from ggml's block layout (gguf-py's GGML_QUANT_SIZES:
bytes per block of weights, scales included), so the allocator and the writer
count exactly the bytes llama.cpp stores.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

T = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class QuantType:
    qtype: gguf.GGMLQuantizationType
    # ggml_quantize_requires_imatrix(): ggml refuses to quantize these without one
    needs_imatrix: bool = False

    @property
    def name(self) -> str:
        return self.qtype.name

    @property
    def block_size(self) -> int:
        return gguf.GGML_QUANT_SIZES[self.qtype][0]

    @property
    def bits_per_weight(self) -> float:
        block_size, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        return 8.0 * type_size / block_size


CANDIDATES: dict[str, QuantType] = {q.name: q for q in (
    QuantType(T.IQ1_S, needs_imatrix=True),
    QuantType(T.IQ1_M),
    QuantType(T.IQ2_XXS, needs_imatrix=True),
    QuantType(T.IQ2_XS, needs_imatrix=True),
    QuantType(T.Q2_K),
    QuantType(T.IQ3_XXS),
    QuantType(T.Q3_K),
    QuantType(T.IQ4_XS),
    QuantType(T.Q4_K),
    QuantType(T.Q5_K),
    QuantType(T.Q6_K),
    QuantType(T.Q8_0),
)}


def quant_type(name: str) -> QuantType:
    try:
        return CANDIDATES[name.upper()]
    except KeyError:
        raise ValueError(f"unknown quantization type {name!r}; choose from {', '.join(CANDIDATES)}") from None
