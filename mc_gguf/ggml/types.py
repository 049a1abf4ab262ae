"""The GGUF quantization types mc-gguf allocates, described once.

Each row mirrors ggml's own description of the type: its id in ``enum
ggml_type`` (ggml.h) and the block size and bytes per block of
``type_traits`` in ggml.c (scales included), so the allocator and the writer
count exactly the bytes llama.cpp stores. The rows are plain data, so that
the command line can list the candidates without importing gguf-py; a test
checks every row against gguf-py's GGMLQuantizationType and GGML_QUANT_SIZES,
and against the bytes ggml's quantizer writes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuantType:
    name: str
    ggml_type: int       # enum ggml_type (ggml.h)
    block_size: int      # weights per block (type_traits.blck_size)
    type_size: int       # bytes per block (type_traits.type_size)
    # ggml_quantize_requires_imatrix(): ggml refuses to quantize these without one
    needs_imatrix: bool = False

    @property
    def qtype(self):
        """gguf-py's GGMLQuantizationType of this type."""
        import gguf

        return gguf.GGMLQuantizationType(self.ggml_type)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


CANDIDATES: dict[str, QuantType] = {q.name: q for q in (
    QuantType("IQ1_S", 19, 256, 50, needs_imatrix=True),
    QuantType("IQ1_M", 29, 256, 56),
    QuantType("IQ2_XXS", 16, 256, 66, needs_imatrix=True),
    QuantType("IQ2_XS", 17, 256, 74, needs_imatrix=True),
    QuantType("Q2_K", 10, 256, 84),
    QuantType("IQ3_XXS", 18, 256, 98),
    QuantType("Q3_K", 11, 256, 110),
    QuantType("IQ4_XS", 23, 256, 136),
    QuantType("Q4_K", 12, 256, 144),
    QuantType("Q5_K", 13, 256, 176),
    QuantType("Q6_K", 14, 256, 210),
    QuantType("Q8_0", 8, 32, 34),
)}


def quant_type(name: str) -> QuantType:
    try:
        return CANDIDATES[name.upper()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown quantization type {name!r}; choose from {', '.join(CANDIDATES)}") from None
