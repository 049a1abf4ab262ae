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

ggml's i-quants quantize 5-20x slower than the K-quants (their lattice
searches: three quarters of the pass at Mixtral's shapes), so they are
measured on a quarter of those blocks (``iquant_share``) and their error
is scaled by how the nearest K-quant's error on that quarter compares with
its error on the whole sample (``RATIO_REFERENCE``, a ratio estimator: an
i-quant's error and a K-quant's of about its bits follow the same weights
from block to block, so their ratio varies far less between blocks than
either error does). The K-quant's quarter costs no quantization: its bytes
there are a subset of the bytes it has for the whole sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mc_gguf.calibrate.settings import CalibrationSettings
from mc_gguf.ggml import quants
from mc_gguf.ggml.types import stored_type


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


@dataclass
class EpsSample:
    """A layer's sampled tokens (moe.StatisticsMoE keeps them): their block inputs [n, H], their experts [n, k] and
    the weights the block applies to them [n, k]."""
    x: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor

    def numpy(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.x.cpu().numpy(), self.ids.cpu().numpy(), self.weights.cpu().numpy()


def sample_errors(w: ExpertWeights, sample: EpsSample, bid: int, xid: int, glu: Callable,
                  imatrix_in: np.ndarray, imatrix_mid: np.ndarray, settings: CalibrationSettings) -> np.ndarray:
    """eps [3, T] of expert ``xid`` of layer ``bid`` (``expert_errors``) on the sampled tokens routed to it, on the
    features seeded by (seed, bid, xid): the same on every machine and whichever layers ran before."""
    slot = sample.ids == xid
    tokens = slot.any(-1)
    features = feature_sample(w.gate.shape[0], settings.eps_features,
                              np.random.default_rng([settings.seed, bid, xid]))
    with torch.no_grad():
        return expert_errors(w, sample.x[tokens], sample.weights[slot], glu, settings.types, imatrix_in,
                             imatrix_mid, features, settings.eps_iquant_share)


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

# The K-quant whose error an i-quant's estimate on a share of the blocks is scaled by (about the same bits).
RATIO_REFERENCE = {"IQ1_S": "Q2_K", "IQ1_M": "Q2_K", "IQ2_XXS": "Q2_K", "IQ2_XS": "Q2_K", "IQ3_XXS": "Q3_K",
                   "IQ4_XS": "Q4_K"}


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
                  features: np.ndarray | None = None, iquant_share: int = 1) -> np.ndarray:
    """eps [3, T] of one expert on its tokens ``x`` [n, H] with routing weights [n]:
    row 0 all projections at the type, row 1 gate and up only, row 2 down only.

    With ``features`` (feature_sample), measured on those intermediate features and scaled to the whole expert.
    With ``iquant_share`` k > 1, the i-quants of RATIO_REFERENCE whose K-quant is among ``types`` are measured on
    1/k of the measured blocks (at least one) and scaled by that K-quant's ratio (the module docstring).
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
    measured = _Measured(w, x, route_weight[:, None], glu)
    n_blocks = w.gate.shape[0] // FEATURE_BLOCK if w.gate.shape[0] % FEATURE_BLOCK == 0 else 0
    n_part = n_blocks // iquant_share if iquant_share > 1 else 0
    part = None
    if n_part >= 1 and n_part < n_blocks:
        # whole blocks of the measured features, spread over them (every k-th)
        blocks = np.arange(n_part) * n_blocks // n_part
        part_index = (blocks[:, None] * FEATURE_BLOCK + np.arange(FEATURE_BLOCK)).reshape(-1)
        part = torch.from_numpy(part_index).to(w.gate.device)
        part_measured = _Measured(w.features(part), x, route_weight[:, None], glu)
    whole: dict[str, np.ndarray] = {}   # squared errors measured on every measured block
    on_part: dict[str, np.ndarray] = {}  # and on the part, for the references

    def measure_whole(name: str) -> np.ndarray:
        if name not in whole:
            q = _quantized(w, name, imatrix_in, imatrix_mid)
            whole[name] = measured.squared_errors(q)
            if part is not None and name in RATIO_REFERENCE.values():
                on_part[name] = part_measured.squared_errors(q.features(part))
        return whole[name]

    for t, name in enumerate(types):
        reference = RATIO_REFERENCE.get(name)
        if part is None or reference not in types:
            eps[:, t] = measure_whole(name)
            continue
        ref_all = measure_whole(reference)
        ref_part = on_part[reference]
        mine = part_measured.squared_errors(_quantized(part_measured.w, name, imatrix_in, imatrix_mid[part_index]))
        # where the reference's error on the part is 0 (no change there), the part's share of the blocks
        eps[:, t] = np.where(ref_part > 0, mine * ref_all / np.where(ref_part > 0, ref_part, 1.0),
                             mine * n_blocks / n_part)
    return np.sqrt(eps) * scale


def _quantized(w: ExpertWeights, name: str, imatrix_in: np.ndarray, imatrix_mid: np.ndarray) -> ExpertWeights:
    """The expert as llama.cpp computes with it at ``name``."""
    return w.with_weights(ggml_roundtrip(w.gate, name, imatrix_in), ggml_roundtrip(w.up, name, imatrix_in),
                          ggml_roundtrip(w.down, name, imatrix_mid))


class _Measured:
    """An expert's full-precision output on its tokens, against which quantized copies are measured."""

    def __init__(self, w: ExpertWeights, x: torch.Tensor, r: torch.Tensor, glu: Callable):
        self.w, self.x, self.r, self.glu = w, x, r, glu
        self.z = expert_hidden(x, w, glu)
        self.y = expert_output(self.z, w)

    def squared_errors(self, q: ExpertWeights) -> np.ndarray:
        """[3]: the squared Frobenius norms of the routed output change with every projection at q, gate and up
        only, down only."""
        zq = expert_hidden(self.x, q, self.glu)
        norms = [torch.linalg.norm(self.r * (expert_output(zq, q) - self.y)),
                 torch.linalg.norm(self.r * (expert_output(zq, self.w) - self.y)),
                 torch.linalg.norm(self.r * (expert_output(self.z, q) - self.y))]
        return np.array([float(n) for n in norms]) ** 2  # a float32 norm squared in float64: its sqrt is the norm
