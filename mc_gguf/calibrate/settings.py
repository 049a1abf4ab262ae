"""What a calibration run measures, and on how much text: the settings, free of heavy imports (the CLI reads them)."""

from __future__ import annotations

from dataclasses import dataclass

from mc_gguf.ggml.types import CANDIDATES, TENSOR_CANDIDATES


@dataclass(frozen=True)
class CalibrationSettings:
    n_tokens: int = 65536         # calibration tokens (the paper: 128 x 2048 = 262,144)
    seq_len: int = 2048           # tokens per sequence, BOS included (capped by the model's context)
    seed: int = 0                 # which windows of the text, and which tokens measure eps
    eps_tokens: int = 8192        # tokens whose MoE inputs measure eps (a seeded sample)
    # intermediate features per expert on which eps is measured, in blocks of 256 (a seeded sample,
    # quant_error.feature_sample); 0: all. Mixtral's experts have 14336, small models often fewer (then all)
    eps_features: int = 2048
    # the i-quants' errors on 1/N of those blocks, scaled by the nearest K-quant's ratio (quant_error.py: they
    # quantize 5-20x slower); 1: on all of them
    eps_iquant_share: int = 4
    hessian: bool = False         # also store full X^T X per expert (for GPTQ)
    # tokens (whole sequences, the first ones) the Fisher information of every layer is measured on (fisher.py),
    # which the allocation then weights the errors with; 0: not measured, every error counts alike (the default:
    # on the bench model the weighting moved a whole file's KLD by 1%, within the noise)
    fisher_tokens: int = 0
    types: tuple[str, ...] = tuple(CANDIDATES)
    # the types the other weight matrices' errors are measured at (calibrate/tensors.py); (): not measured, and
    # those tensors stay at their class's type whatever the budget
    tensor_types: tuple[str, ...] = TENSOR_CANDIDATES
    # the torch device of the layer forward and the error pass's products (ggml's quantizer runs on the CPU);
    # not part of what the statistics were measured from
    device: str = "cpu"
