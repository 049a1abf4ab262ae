"""One expert projection at its plan's type: ggml's quantizer with the importance matrix, GPTQ on the expert's
Hessians, or GPTQ then tuning; the down projection fit to what the quantized gate and up give it. Used by the
writer one expert at a time (quantization.py) and by a cluster's tasks (cluster.py) alike."""

from __future__ import annotations

import gguf
import numpy as np

from mc_gguf.allocate.plan import Plan
from mc_gguf.calibrate.stats import CalibrationStats
from mc_gguf.ggml import quants
from mc_gguf.ggml.types import quant_type
from mc_gguf.hf.checkpoint import Checkpoint
from mc_gguf.quantize.gptq import Hessian, gptq_quantize
from mc_gguf.quantize.hessian import ExpertHessians
from mc_gguf.quantize.tune import TuneSettings, tune_quantize


class ExpertQuantizer:
    """``experts(bid, xid, projection)``: ggml's bytes [rows, row_bytes] of one expert projection at the plan's
    type. With ``hessians``, by GPTQ (and, with ``tune``, tuned after it), the down projection fit to what
    the quantized gate and up give it (hessian.py's down_target); the current layer's gate and up bytes are
    kept for that until the next layer is asked for."""

    def __init__(self, ckpt: Checkpoint, plan: Plan, stats: CalibrationStats | None,
                 hessians: ExpertHessians | None = None, tune: TuneSettings | None = None):
        self.ckpt, self.plan, self.stats, self.hessians, self.tune = ckpt, plan, stats, hessians, tune
        self._bid: int | None = None
        self._kept: dict[tuple[int, str], np.ndarray] = {}
        self._input_hessian: tuple[int, int, Hessian] | None = None  # gate's, factored once, for up

    def __call__(self, bid: int, xid: int, projection: str) -> np.ndarray:
        if self.hessians is None:
            return self._quantize(bid, xid, projection)
        if bid != self._bid:
            self._bid, self._kept = bid, {}
        if projection == "down":
            # the quantized gate and up in a list down_target empties, so that they go once it has summed them
            target = self.hessians.down_target(bid, xid, [self.dequantized(bid, xid, p) for p in ("gate", "up")])
            return self._quantize(bid, xid, projection, target.weights, target.hessian)
        if (xid, projection) not in self._kept:
            self._kept[xid, projection] = self._quantize(bid, xid, projection)
        return self._kept[xid, projection]

    def dequantized(self, bid: int, xid: int, projection: str) -> np.ndarray:
        """The weights [rows, cols] llama.cpp computes with for a gate or up projection."""
        data = self(bid, xid, projection)
        cols = self.ckpt.expert_shape(bid, projection)[1]
        return quants.dequantize(data, self._qtype(bid, xid, projection), cols).reshape(-1, cols)

    def _qtype(self, bid: int, xid: int, projection: str) -> gguf.GGMLQuantizationType:
        return quant_type(self.plan.experts[bid][xid][projection]).qtype

    def _quantize(self, bid: int, xid: int, projection: str, weights: np.ndarray | None = None,
                  hessian: Hessian | None = None) -> np.ndarray:
        qtype = self._qtype(bid, xid, projection)
        if weights is None:
            weights = self.ckpt.expert_weight(bid, xid, projection)
        which = "mid" if projection == "down" else "in"
        imatrix = self.stats.layers[bid].imatrix(which)[xid] if self.stats is not None else None
        if self.hessians is None:
            return quants.quantize(weights, qtype, imatrix)
        passed = hessian is not None
        if not passed:
            hessian = self._shared_input_hessian(bid, xid)
        if self.tune is not None:   # down's fit's Hessian (passed in) serves this one call
            return tune_quantize(weights, hessian, qtype, imatrix, self.tune, single_use=passed)
        return gptq_quantize(weights, hessian, qtype, imatrix)

    def _shared_input_hessian(self, bid: int, xid: int) -> Hessian:
        """The Hessian of gate's and up's input (the same matrix), built and factored once per expert."""
        if self._input_hessian is None or self._input_hessian[:2] != (bid, xid):
            self._input_hessian = None
            self._input_hessian = (bid, xid, Hessian(self.hessians(bid, xid, "in")))
        return self._input_hessian[2]
