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


# Bytes per block as ggml-common.h's static_asserts on block_X add them up (QK_K weights per super-block;
# a ggml_half is 2 bytes; K_SCALE_SIZE 12 bytes of packed 6-bit scales and minimums).
QK_K, HALF, K_SCALE_SIZE = 256, 2, 12

# The types compress allocates among by default, fewest bits first.
CANDIDATES: dict[str, QuantType] = {q.name: q for q in (
    QuantType("IQ1_S", 19, QK_K, HALF + QK_K // 8 + QK_K // 16, needs_imatrix=True),        # d, qs, qh
    QuantType("IQ1_M", 29, QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32),                      # qs, qh, scales
    QuantType("IQ2_XXS", 16, QK_K, HALF + QK_K // 8 * 2, needs_imatrix=True),              # d, qs
    QuantType("IQ2_XS", 17, QK_K, HALF + QK_K // 8 * 2 + QK_K // 32, needs_imatrix=True),  # d, qs, scales
    QuantType("Q2_K", 10, QK_K, 2 * HALF + QK_K // 16 + QK_K // 4),                          # d, dmin, scales, qs
    QuantType("IQ3_XXS", 18, QK_K, HALF + 3 * (QK_K // 8)),                                  # d, qs (grid + signs)
    QuantType("Q3_K", 11, QK_K, HALF + QK_K // 4 + QK_K // 8 + 12),                          # d, qs, hmask, scales
    QuantType("IQ4_XS", 23, QK_K, HALF + 2 + QK_K // 64 + QK_K // 2),                        # d, scales_h/_l, qs
    QuantType("Q4_K", 12, QK_K, 2 * HALF + K_SCALE_SIZE + QK_K // 2),                        # d, dmin, scales, qs
    QuantType("Q5_K", 13, QK_K, 2 * HALF + K_SCALE_SIZE + QK_K // 2 + QK_K // 8),            # ... and qh
    QuantType("Q6_K", 14, QK_K, HALF + QK_K // 16 + 3 * QK_K // 4),                          # d, scales, ql + qh
    QuantType("Q8_0", 8, 32, HALF + 32),                                                     # d, qs
)}

# The types the other weight matrices (attention, token embeddings, output head) are measured and allocated at when
# they join the budget (calibrate/tensors.py), fewest bits first: none needs an importance matrix, which
# llama-imatrix does not collect for token_embd, and none below Q2_K, since every token reads these tensors.
TENSOR_CANDIDATES = ("Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0")

# Types a row length that is not whole 256-blocks falls back to (tensor_type_fallback below).
FALLBACKS: dict[str, QuantType] = {q.name: q for q in (
    QuantType("IQ4_NL", 20, 32, HALF + 32 // 2),            # d, qs
    QuantType("Q4_0", 2, 32, HALF + 32 // 2),               # d, qs
    QuantType("Q5_0", 6, 32, HALF + 4 + 32 // 2),           # d, qh, qs
    QuantType("Q5_1", 7, 32, 2 * HALF + 4 + 32 // 2),       # d, m, qh, qs
    QuantType("F16", 1, 1, HALF),
)}

# Every type mc-gguf may store an expert in, fewest bits first (the order of expert groups in a file).
TYPES: dict[str, QuantType] = dict(sorted({**CANDIDATES, **FALLBACKS}.items(),
                                          key=lambda item: (item[1].bits_per_weight, item[1].ggml_type)))

# llama-quant.cpp's tensor_type_fallback: a 256-block type on rows that are whole 32-blocks only.
_FALLBACK_OF = {
    **dict.fromkeys(("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ4_XS"), "IQ4_NL"),
    **dict.fromkeys(("Q2_K", "Q3_K"), "Q4_0"),
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}


def quant_type(name: str) -> QuantType:
    try:
        return TYPES[name.upper()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown quantization type {name!r}; choose from {', '.join(TYPES)}") from None


def stored_type(name: str, n_per_row: int) -> QuantType:
    """The type rows of ``n_per_row`` weights are stored in when ``name`` is asked for, as llama-quantize
    decides in tensor_type_fallback (llama-quant.cpp): ``name`` itself when the rows are whole blocks of it,
    else its 32-block fallback (IQ* -> IQ4_NL, Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0),
    else F16, which takes any length."""
    wanted = quant_type(name)
    if n_per_row % wanted.block_size == 0:
        return wanted
    fallback = quant_type(_FALLBACK_OF.get(wanted.name, wanted.name))
    return fallback if n_per_row % fallback.block_size == 0 else TYPES["F16"]
