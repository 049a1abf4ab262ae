"""The down projection's target when gate and up are quantized: the least-squares fit, recomputed here from
the calibration's inputs in numpy, and what it buys."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

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
    down = hessians.down_target(bid, xid, [q["gate"], q["up"]])
    target, hessian = down.weights, down.hessian.matrix
    assert down.ridge is not None  # the fit held out better than W here (else W would be the target)

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
    fitted = expert_error(gptq(target, down.hessian))
    assert expert_error(target) < expert_error(w["down"])
    assert fitted < 0.9 * plain


def test_down_targets_first_fold_sums_are_kept_at_the_ridges_rows_alone(calibration, tiny_model_dir, monkeypatch):
    """The first fold's b is summed only at the rows of down that choose the ridge: the same numbers as the
    whole sum's columns there, and the ridge's choice reads no other."""
    from mc_gguf.hf.checkpoint import open_checkpoint
    from mc_gguf.quantize import hessian as hs

    _, stats = calibration
    ckpt = open_checkpoint(tiny_model_dir)
    bid, layer = 1, stats.layers[1]
    xid = int(np.argmax(layer.count))
    hidden = ckpt.expert_weight(bid, xid, "down").shape[0]
    q = [quants.dequantize(quants.quantize(ckpt.expert_weight(bid, xid, p), T.Q2_K, None), T.Q2_K, hidden)
         for p in ("gate", "up")]
    seen = []
    monkeypatch.setattr(hs, "fit_down", lambda w, sums: seen.append(sums))
    monkeypatch.setattr(hs, "RIDGE_ROWS", hidden)
    hs.ExpertHessians(ckpt, stats).down_target(bid, xid, list(q))
    monkeypatch.setattr(hs, "RIDGE_ROWS", hidden // 4)
    hs.ExpertHessians(ckpt, stats).down_target(bid, xid, list(q))
    whole, sampled = seen
    rows = hs.ridge_rows(hidden)
    features = whole.h.shape[0]
    assert whole.b_first.shape == (features, hidden) and sampled.b_first.shape == (features, hidden // 4)
    np.testing.assert_array_equal(sampled.b_first, whole.b_first[:, rows])
    for name in ("h", "b", "h_first"):
        np.testing.assert_array_equal(getattr(sampled, name), getattr(whole, name))


def ridge_problem(tokens: int, distorted: bool, rows: int, seed: int) -> tuple:
    """(W, H' folds, b folds) of a down projection whose inputs z_q differ from z systematically (``distorted``) or
    by noise alone, on two halves of ``tokens``."""
    rng = np.random.default_rng(seed)
    features = 64
    w = rng.standard_normal((rows, features))
    z = rng.standard_normal((tokens, features))
    z_q = z @ (np.eye(features) + 0.3 * rng.standard_normal((features, features)) / 8) if distorted else z
    z_q = z_q + 0.05 * rng.standard_normal(z_q.shape)
    y = z @ w.T
    folds = [slice(0, tokens // 2), slice(tokens // 2, tokens)]
    return w, [z_q[f].T @ z_q[f] for f in folds], [z_q[f].T @ y[f] for f in folds]


@pytest.mark.parametrize("tokens, distorted, fits", [(4096, True, True), (48, False, False)])
def test_the_ridge_is_chosen_on_held_out_tokens(tokens, distorted, fits):
    """A systematic change of down's inputs, seen on many tokens, is fit; inputs that differ only by noise, on
    fewer tokens than features, are not (the fit would learn the noise): W itself is kept."""
    from mc_gguf.quantize.hessian import DownSums, _held_out_ridge

    w, h, b = ridge_problem(tokens, distorted, rows=32, seed=3)
    assert (_held_out_ridge(w, DownSums.of_folds(h, b)) is not None) == fits


@pytest.mark.parametrize("tokens, distorted", [(4096, True), (48, False), (200, True)])
def test_the_ridge_chosen_on_a_sample_of_rows_is_the_one_all_rows_choose(tokens, distorted, monkeypatch):
    """Each row of down solves its own least squares with the same matrix, so the held-out errors of a seeded
    sample of the rows choose the ridge all of them choose."""
    from mc_gguf.quantize import hessian as hs

    w, h, b = ridge_problem(tokens, distorted, rows=600, seed=5)
    monkeypatch.setattr(hs, "RIDGE_ROWS", len(w))
    every_row = hs._held_out_ridge(w, hs.DownSums.of_folds(h, b))
    monkeypatch.setattr(hs, "RIDGE_ROWS", 64)
    assert hs._held_out_ridge(w, hs.DownSums.of_folds(h, b)) == every_row


def test_the_ridge_fit_is_the_normal_equations_solution_on_a_copy():
    """_ridge_fit solves (H' + lambda I) X = b + lambda W^T (numpy's dense solve of the same equations) on
    copies, leaving H' and b as they were, in float64 or float32."""
    from mc_gguf.quantize.gptq import mean_diagonal
    from mc_gguf.quantize.hessian import _ridge_fit

    w, h, b = ridge_problem(2048, True, rows=16, seed=7)
    h, b = h[0] + h[1], b[0] + b[1]
    lam = 0.1 * mean_diagonal(h)
    expected = np.linalg.solve(h + lam * np.eye(len(h)), b + lam * w.T).T
    kept = h.copy()
    np.testing.assert_allclose(_ridge_fit(w, h, b, 0.1), expected, rtol=1e-8, atol=1e-12)
    np.testing.assert_array_equal(h, kept)
    rhs = b.copy()
    single = _ridge_fit(w, kept, b, 0.1, np.float32)
    assert single.dtype == np.float32
    np.testing.assert_allclose(single, expected, rtol=1e-2, atol=1e-3 * np.abs(expected).max())
    np.testing.assert_array_equal(h, kept)
    np.testing.assert_array_equal(b, rhs)


def test_the_fit_and_gptq_share_one_factorization_of_the_damped_hessian():
    """fit_down factors H' + lambda I once: the fit is numpy's dense solve of the normal equations (W kept on a
    column no token reached), and GPTQ's inverse factor made from that factorization is, bit for bit, the
    one Hessian(H', ridge) computes on its own, so GPTQ gives the same bytes from either."""
    from mc_gguf.quantize.gptq import Hessian, inverse_hessian_factor
    from mc_gguf.quantize.hessian import DownSums, fit_down

    w, h, b = ridge_problem(4096, True, rows=16, seed=11)
    for m in h + b:
        m[5] = 0.0  # no token reached feature 5
    for m in h:
        m[:, 5] = 0.0
    total_h, total_b = h[0] + h[1], b[0] + b[1]
    down = fit_down(w, DownSums.of_folds(h, b))
    assert down.ridge is not None and "factor" in vars(down.hessian)  # factored by the fit, not yet by GPTQ
    stored = total_h.astype(np.float32)
    np.testing.assert_array_equal(down.hessian.matrix, stored)
    damp = down.hessian.damp
    lam = damp * np.mean(np.diag(stored.astype(np.float64)) + (np.diag(stored) == 0))
    assert down.ridge == pytest.approx(lam, rel=1e-12)
    a = stored.astype(np.float64) + lam * np.eye(len(stored))
    rhs = total_b + lam * w.T
    expected = np.linalg.solve(a, rhs).T
    expected[:, 5] = w[:, 5]
    np.testing.assert_allclose(down.weights, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())

    u, dead = down.hessian.factor
    u_own, dead_own = inverse_hessian_factor(stored, damp)
    np.testing.assert_array_equal(u, np.ascontiguousarray(u_own, dtype=np.float32))
    np.testing.assert_array_equal(dead, dead_own)
    assert dead[5] and dead.sum() == 1
    weights = np.random.default_rng(0).standard_normal((8, w.shape[1])).astype(np.float32)
    np.testing.assert_array_equal(gptq_quantize(weights, down.hessian, T.Q4_0),
                                  gptq_quantize(weights, Hessian(stored, damp), T.Q4_0))
