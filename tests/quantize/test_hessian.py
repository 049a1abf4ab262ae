"""The down projection's target when gate and up are quantized: the least-squares fit, recomputed here from
the calibration's inputs in numpy, and what it buys."""

from __future__ import annotations

import gguf
import numpy as np

from mc_gguf.ggml import quants
from mc_gguf.quantize.gptq import gptq_quantize

T = gguf.GGMLQuantizationType


def test_down_target_is_the_ridge_fit_to_the_quantized_gate_and_up_and_lowers_the_expert_error(
        calibration, tiny_model_dir):
    from mc_gguf.hf.checkpoint import open_checkpoint
    from mc_gguf.quantize.hessian import ExpertHessians

    _, stats = calibration
    ckpt = open_checkpoint(tiny_model_dir)
    hessians = ExpertHessians(ckpt, stats)
    bid, layer = 1, stats.layers[1]
    xid = int(np.argmax(layer.count))
    w = {p: ckpt.expert_weight(bid, xid, p) for p in ("gate", "up", "down")}
    imatrix = layer.imatrix("in")[xid]
    q = {p: quants.dequantize(quants.quantize(w[p], T.Q2_K, imatrix), T.Q2_K, w[p].shape[1]) for p in ("gate", "up")}
    down = hessians.down_target(bid, xid, q["gate"], q["up"])
    target, hessian = down.weights, down.hessian
    print("RIDGE", down.ridge, layer.count[xid])

    # every token routed to the expert, weighted by the weight the block gave it (Mixtral: SiLU(gate) * up)
    mine = layer.routed_ids == xid
    routed = mine.any(-1)
    g = (layer.routed_weights * mine).sum(-1)[routed, None].astype(np.float64)
    x = stats.moe_input(bid)[routed].astype(np.float64)

    def mid(gate, up):
        a = x @ gate.T.astype(np.float64)
        return a / (1 + np.exp(-a)) * (x @ up.T.astype(np.float64))

    z, z_q = mid(w["gate"], w["up"]) * g, mid(q["gate"], q["up"]) * g
    y = z @ w["down"].T.astype(np.float64)
    np.testing.assert_allclose(hessian, z_q.T @ z_q, rtol=1e-4, atol=1e-6 * np.abs(hessian).max())
    lam = down.ridge
    ridge = np.sqrt(lam) * np.eye(z_q.shape[1])
    fit = np.linalg.lstsq(np.vstack([z_q, ridge]), np.vstack([y, ridge @ w["down"].T]), rcond=None)[0].T
    np.testing.assert_allclose(target, fit, rtol=1e-3, atol=1e-4 * np.abs(fit).max())

    def expert_error(down):
        return float(np.sum((y - z_q @ down.T) ** 2))

    def gptq(weights, h):
        return quants.dequantize(gptq_quantize(weights, h, T.Q4_K, layer.imatrix("mid")[xid]), T.Q4_K,
                                 weights.shape[1])

    plain = expert_error(gptq(w["down"], hessians(bid, xid, "mid")))
    fitted = expert_error(gptq(target, hessian))
    assert expert_error(target) < expert_error(w["down"])
    assert fitted < 0.9 * plain
