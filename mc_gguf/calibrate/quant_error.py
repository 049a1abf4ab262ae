"""eps(e, b): how much the MoE block's output changes when only expert e is quantized to type b.

With every other expert at full precision the block output changes only on
the tokens routed to e, by r_t * (E_e(x_t) - E_e^b(x_t)) (r_t: the routing
weight the block applies to e's output). eps is the Frobenius norm of that
change over the calibration tokens, not squared, as in the MC authors' code.

The quantized weights are ggml's own: quantized by ``ggml_quantize_chunk``
(with the expert's imatrix) and read back by the type's ``to_float``, as
llama.cpp computes with them.

Measuring every type on a whole Mixtral expert costs minutes per projection,
so eps may be measured on a seeded sample of the expert's intermediate
features (``feature_sample``), in whole blocks of 256. Every candidate type
quantizes each row and each block of 256 weights on its own (ggml's
quantize_row_*_impl loop over superblocks of QK_K), so the sampled features'
rows of gate and up and their columns of down are quantized to exactly the
bytes the whole expert's quantization holds there: the sample is a smaller
expert with the same errors. Its squared output error, scaled by
features / sampled features, estimates the whole expert's (the errors of
different blocks are independent, so their cross terms average out);
tests/calibrate check it against the full pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mc_gguf.ggml import quants
from mc_gguf.ggml.types import stored_type
from mc_gguf.hf.checkpoint import SWIGLU_OAI


@dataclass
class ExpertWeights:
    gate: torch.Tensor  # [F, H]
    up: torch.Tensor    # [F, H]
    down: torch.Tensor  # [H, F]
    # float32 biases [F], [F], [H] where the family has them (gpt-oss); never quantized
    biases: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def float32(self) -> ExpertWeights:
        """The same weights in float32 (the very tensors when they are float32 already; bf16 widens exactly)."""
        return ExpertWeights(self.gate.float(), self.up.float(), self.down.float(), self.biases)

    def to(self, device: torch.device) -> ExpertWeights:
        """The same weights on ``device`` (the very tensors where they are there already)."""
        biases = self.biases and tuple(b.to(device) for b in self.biases)
        return ExpertWeights(self.gate.to(device), self.up.to(device), self.down.to(device), biases)

    def with_weights(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> ExpertWeights:
        return ExpertWeights(gate, up, down, self.biases)

    def features(self, index: torch.Tensor) -> ExpertWeights:
        """The expert restricted to the intermediate features ``index`` (rows of gate and up, columns of down)."""
        biases = self.biases and (self.biases[0][index], self.biases[1][index], self.biases[2])
        return ExpertWeights(self.gate[index], self.up[index], self.down[:, index].contiguous(), biases)


# An expert's gated activation of (x gate^T + b_gate, x up^T + b_up), by the row's expert_activation; built from
# config.json. "act": hidden_act of gate, times up (SwiGLU where hidden_act is silu, as llama.cpp computes it);
# "swiglu-oai": GptOssExperts._apply_gate, llama.cpp's ggml_swiglu_oai (gate clamped above at the limit, up at
# +-limit, (up + 1) * gate * sigmoid(alpha * gate)).
def _act_times_up(config: dict) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from transformers.activations import ACT2FN

    act = ACT2FN[config.get("hidden_act", "silu")]
    return lambda gate, up: act(gate) * up


def _swiglu_oai(config: dict) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    alpha, limit = (float(config.get(key, default)) for key, default in SWIGLU_OAI.items())

    def glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=limit)
        return (up.clamp(-limit, limit) + 1) * gate * torch.sigmoid(alpha * gate)

    return glu


GATED_ACTIVATIONS: dict[str, Callable[[dict], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = {
    "act": _act_times_up,
    "swiglu-oai": _swiglu_oai,
}


def expert_hidden(x: torch.Tensor, w: ExpertWeights, glu: Callable) -> torch.Tensor:
    """z = glu(x gate^T, x up^T) (plus the biases): the down projection's input [n, F]."""
    gate, up = x @ w.gate.T, x @ w.up.T
    if w.biases is not None:
        gate, up = gate + w.biases[0], up + w.biases[1]
    return glu(gate, up)


def expert_output(z: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """The expert's output z down^T (plus the down bias) [n, H]."""
    y = z @ w.down.T
    return y + w.biases[2] if w.biases is not None else y


def ggml_roundtrip(weights: torch.Tensor, type_name: str, imatrix: np.ndarray | None) -> torch.Tensor:
    """The weights as llama.cpp will compute with them when ``type_name`` is asked for (rows that are not
    whole blocks of it are stored in its fallback, types.stored_type)."""
    qtype = stored_type(type_name, weights.shape[-1]).qtype
    data = quants.quantize(weights.cpu().numpy(), qtype, imatrix)  # ggml's quantizer runs on the CPU
    return torch.from_numpy(quants.dequantize(data, qtype, weights.shape[-1]).reshape(weights.shape)).to(
        weights.device)


FEATURE_BLOCK = 256  # QK_K (ggml-common.h): the largest block of every candidate type


def sampled_features(ff: int, n_features: int) -> int:
    """How many of ``ff`` features measure eps when ``n_features`` are asked for: whole blocks of 256, or all
    of them (``n_features`` 0 or >= ff, fewer than one block, or ff not whole blocks)."""
    n_blocks = n_features // FEATURE_BLOCK
    if n_features <= 0 or n_features >= ff or ff % FEATURE_BLOCK or n_blocks == 0:
        return ff
    return n_blocks * FEATURE_BLOCK


def feature_sample(ff: int, n_features: int, rng: np.random.Generator) -> np.ndarray | None:
    """Sorted indices of the sampled intermediate features (sampled_features' count), or None for all of them."""
    count = sampled_features(ff, n_features)
    if count == ff:
        return None
    blocks = np.sort(rng.choice(ff // FEATURE_BLOCK, size=count // FEATURE_BLOCK, replace=False))
    return (blocks[:, None] * FEATURE_BLOCK + np.arange(FEATURE_BLOCK)).reshape(-1)


def expert_errors(w: ExpertWeights, x: torch.Tensor, route_weight: torch.Tensor, glu: Callable,
                  types: Sequence[str], imatrix_in: np.ndarray, imatrix_mid: np.ndarray,
                  features: np.ndarray | None = None) -> np.ndarray:
    """eps [3, T] of one expert on its tokens ``x`` [n, H] with routing weights [n]:
    row 0 all projections at the type, row 1 gate and up only, row 2 down only.

    With ``features`` (feature_sample), measured on those intermediate features and scaled to the whole expert.
    The weights may be in the checkpoint's dtype: they are widened to float32 here, after the sampling, on the
    device of ``x`` (ggml's quantizer runs on the CPU, the products there).
    """
    eps = np.zeros((3, len(types)))
    if x.shape[0] == 0:
        return eps
    scale = 1.0
    if features is not None:
        scale = float(np.sqrt(w.gate.shape[0] / len(features)))
        index = torch.from_numpy(features).to(w.gate.device)
        w = w.features(index)
        imatrix_mid = imatrix_mid[features]
    w = w.float32().to(x.device)
    r = route_weight[:, None]
    z = expert_hidden(x, w, glu)
    y = expert_output(z, w)
    for t, name in enumerate(types):
        q = w.with_weights(ggml_roundtrip(w.gate, name, imatrix_in), ggml_roundtrip(w.up, name, imatrix_in),
                           ggml_roundtrip(w.down, name, imatrix_mid))
        zq = expert_hidden(x, q, glu)
        eps[0, t] = float(torch.linalg.norm(r * (expert_output(zq, q) - y)))
        eps[1, t] = float(torch.linalg.norm(r * (expert_output(zq, w) - y)))
        eps[2, t] = float(torch.linalg.norm(r * (expert_output(z, q) - y)))
    return eps * scale
