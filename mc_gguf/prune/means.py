"""Online Dynamic Pruning's mean outputs: what a skipped slot adds instead of nothing.

With the kept weights left as they are (mc.odp.renormalize false, mc-gguf's
default) a skipped slot i drops its share a_i y_i of the MoE block's output
(a_i the weight the block applies, y_i its expert's output). The calibration
pass keeps, for every expert, the constant m that replaces those shares best
over its slots i >= 1: the least-squares m of sum ||a_i y_i - a_i m||^2, the
mean of y_i weighted by a_i^2 (calibrate/moe.py, ``skip_mean``). A file may
carry them as ``blk.N.ffn_odp_mean.weight`` (F32 [E, H]); the runtime's
build_moe_ffn (patch 0011) then adds a_i m_e for every skipped slot of expert
e. On the bench model that brings the KL divergence of pruning 25% to 45%
of the slots to 0.80x to 0.85x of what it is without them, on text the
calibration never saw (scripts/bench_odp.py; README, "What a skipped slot
adds").

Stock llama.cpp counts such a tensor as one too many and refuses the file, so
only files it refuses anyway (the per-expert layout's groups) carry them:
a file any llama.cpp loads stays loadable and prunes without them.
"""

from __future__ import annotations

import gguf
import numpy as np

from mc_gguf.calibrate.stats import CalibrationStats
from mc_gguf.gguf_io.layout import odp_mean_name
from mc_gguf.gguf_io.requirements import ODP_MEAN_TENSOR, requirements
from mc_gguf.gguf_io.write import OutputTensor
from mc_gguf.prune.rule import OdpParams


def mean_tensors(stats: CalibrationStats, odp: OdpParams) -> list[OutputTensor]:
    """The mean outputs of the layers ``odp`` prunes, where the statistics have them; none when the kept weights
    are renormalised (the skipped share is then handed to the kept slots, not dropped)."""
    if odp.renormalize:
        return []
    tensors = []
    for bid, layer in enumerate(stats.layers):
        if layer is None or layer.skip_mean is None or odp.mu[bid] <= 0.0:
            continue
        mean = np.ascontiguousarray(layer.skip_mean, dtype=np.float32)
        tensors.append(OutputTensor(odp_mean_name(bid), mean.shape, gguf.GGMLQuantizationType.F32,
                                    lambda mean=mean: mean))
    return tensors


def means_bytes(ckpt) -> int:
    """The most bytes a file of ``ckpt`` spends on mean outputs: one F32 [E, H] tensor per MoE layer, its data
    aligned to 32 bytes and its entry in the tensor table."""
    hidden, _ = ckpt.expert_dims
    data = -(-ckpt.n_experts * hidden * 4 // 32) * 32
    return len(ckpt.moe_layers) * (data + 128)


def carries_means(arch: str, tensor_names) -> bool:
    """Whether a file of ``arch`` with these tensors (its mean outputs aside) may carry mean outputs: only when
    stock llama.cpp refuses it anyway."""
    return not requirements(arch, [n for n in tensor_names if not ODP_MEAN_TENSOR.search(n)], {}).stock_loads
