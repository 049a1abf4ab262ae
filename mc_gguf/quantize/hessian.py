"""GPTQ's Hessians, built one expert at a time from what ``calibrate --hessian`` kept.

For expert e of a layer, with x_t the MoE block's input of calibration token t and g_t the weight the block
applied to e's output for t (0 where t was not routed to e):

    H_in  = sum_t g_t^2 x_t x_t^T                                  (the input of gate and up)
    H_mid = sum_t g_t^2 z_t z_t^T,  z_t = glu(x_t gate^T, x_t up^T)  (the input of down)

since each token's error reaches the layer's output times the routing weight it was given. The statistics
keep every token's x_t and routing instead of these sums (a layer's E x (H^2 + F^2) of them is 7 GB at
Mixtral 8x7B's shapes), so only one layer's inputs (tokens x H float32: 64 MB for 4096 tokens of Mixtral)
and one expert's Hessian are in memory while quantizing.
"""

from __future__ import annotations

import numpy as np
import torch

from mc_gguf.calibrate.forward import load_expert
from mc_gguf.calibrate.quant_error import GATED_ACTIVATIONS, expert_hidden
from mc_gguf.calibrate.stats import CalibrationStats
from mc_gguf.errors import McGgufError
from mc_gguf.hf.checkpoint import Checkpoint


class ExpertHessians:
    """``hessians(bid, xid, which)``: expert ``xid`` of layer ``bid``'s Hessian [n, n] float32 of the input of
    gate and up (``which`` "in") or of down ("mid"), from the statistics of ``ckpt``; the inputs of the last
    layer asked for are kept until another layer is asked for."""

    def __init__(self, ckpt: Checkpoint, stats: CalibrationStats):
        if not stats.has_hessian:
            raise McGgufError("GPTQ needs the experts' Hessians: calibrate with --hessian")
        self.ckpt = ckpt
        self.stats = stats
        self.glu = GATED_ACTIVATIONS[ckpt.arch.expert_activation](ckpt.config)
        self._bid: int | None = None
        self._inputs: torch.Tensor | None = None

    def inputs(self, bid: int) -> torch.Tensor:
        if self._bid != bid:
            self._bid, self._inputs = None, None  # the last layer's go before the next layer's are read
            self._inputs = torch.from_numpy(self.stats.moe_input(bid))
            self._bid = bid
        return self._inputs

    def routed(self, bid: int, xid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, g): the calibration tokens routed to the expert and the weight [n, 1] the block gave it."""
        layer = self.stats.layers[bid]
        mine = torch.from_numpy(layer.routed_ids == xid)
        tokens = mine.any(-1).nonzero().squeeze(-1)
        g = (torch.from_numpy(layer.routed_weights)[tokens] * mine[tokens]).sum(-1, keepdim=True)
        return tokens, g

    def __call__(self, bid: int, xid: int, which: str) -> np.ndarray:
        tokens, g = self.routed(bid, xid)
        with torch.no_grad():
            x = self.inputs(bid)[tokens]
            if which == "mid":
                x = expert_hidden(x, load_expert(self.ckpt, bid, xid).float32(), self.glu)
            xw = x * g
            return (xw.T @ xw).numpy()
