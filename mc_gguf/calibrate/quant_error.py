"""eps(e, b): how much the MoE block's output changes when only expert e is quantized to type b.

With every other expert at full precision the block output changes only on
the tokens routed to e, by r_t * (E_e(x_t) - E_e^b(x_t)) (r_t: the routing
weight the block applies to e's output). eps is the Frobenius norm of that
change over the calibration tokens, not squared, as in the MC authors' code.

The quantized weights are ggml's own: quantized by ``ggml_quantize_chunk``
(with the expert's imatrix) and read back by the type's ``to_float``, as
llama.cpp computes with them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mc_gguf.ggml import quants
from mc_gguf.ggml.types import quant_type


@dataclass
class ExpertWeights:
    gate: torch.Tensor  # [F, H]
    up: torch.Tensor    # [F, H]
    down: torch.Tensor  # [H, F]

    def float32(self) -> ExpertWeights:
        """The same weights in float32 (the very tensors when they are float32 already; bf16 widens exactly)."""
        return ExpertWeights(self.gate.float(), self.up.float(), self.down.float())


def expert_hidden(x: torch.Tensor, w: ExpertWeights, act: Callable) -> torch.Tensor:
    """z = act(x gate^T) * (x up^T): the down projection's input [n, F]."""
    return act(x @ w.gate.T) * (x @ w.up.T)


def ggml_roundtrip(weights: torch.Tensor, type_name: str, imatrix: np.ndarray | None) -> torch.Tensor:
    """The weights as llama.cpp will compute with them at ``type_name``."""
    qtype = quant_type(type_name).qtype
    data = quants.quantize(weights.numpy(), qtype, imatrix)
    return torch.from_numpy(quants.dequantize(data, qtype, weights.shape[-1]).reshape(weights.shape))


def expert_errors(w: ExpertWeights, x: torch.Tensor, route_weight: torch.Tensor, act: Callable,
                  types: Sequence[str], imatrix_in: np.ndarray, imatrix_mid: np.ndarray) -> np.ndarray:
    """eps [3, T] of one expert on its tokens ``x`` [n, H] with routing weights [n]:
    row 0 all projections at the type, row 1 gate and up only, row 2 down only."""
    eps = np.zeros((3, len(types)))
    if x.shape[0] == 0:
        return eps
    r = route_weight[:, None]
    z = expert_hidden(x, w, act)
    y = z @ w.down.T
    for t, name in enumerate(types):
        q = ExpertWeights(ggml_roundtrip(w.gate, name, imatrix_in), ggml_roundtrip(w.up, name, imatrix_in),
                          ggml_roundtrip(w.down, name, imatrix_mid))
        zq = expert_hidden(x, q, act)
        eps[0, t] = torch.linalg.norm(r * (zq @ q.down.T - y))
        eps[1, t] = torch.linalg.norm(r * (zq @ w.down.T - y))
        eps[2, t] = torch.linalg.norm(r * (z @ q.down.T - y))
    return eps
