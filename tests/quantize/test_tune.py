"""Tuned K-quant integers and i-quant scales: ggml dequantizes the written bytes to the tuner's own weights, the
result is a local optimum of the Hessian loss by brute force over every single move, and it loads in llama.cpp."""

from __future__ import annotations

from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch

from mc_gguf.ggml import iquants, kquants, quants
from mc_gguf.quantize.gptq import damped, gptq_quantize
from mc_gguf.quantize.tune import TuneSettings, _Descent, tunable, tune_blocks, tune_quantize

T = gguf.GGMLQuantizationType
K_TYPES = tuple(kquants.FORMATS)
I_TYPES = tuple(iquants.FORMATS)


@pytest.fixture(scope="module")
def layer():
    """A weight matrix and the Hessian of strongly correlated inputs (what an imatrix cannot see)."""
    rng = np.random.default_rng(11)
    n, cols, rows = 2048, 512, 24
    mixing = 0.3 * np.eye(cols) + rng.standard_normal((cols, 16)) @ rng.standard_normal((16, cols)) / 4
    x = rng.standard_normal((n, cols)) @ mixing
    w = (0.05 * rng.standard_normal((rows, cols))).astype(np.float32)
    w[3, :256] *= 8.0  # one super-block of large weights
    return w, x.T @ x, (x ** 2).mean(axis=0).astype(np.float32)


def loss(w, hessian, data, qtype) -> float:
    """The tuner's loss, computed from what ggml dequantizes the bytes to."""
    e = (w - quants.dequantize(data, qtype, w.shape[1])).astype(np.float64)
    return float(np.sum((e @ damped(hessian)) * e))


@pytest.mark.parametrize("name", K_TYPES)
def test_ggml_dequantizes_the_bytes_to_the_tuned_weights(layer, name):
    w, hessian, imatrix = layer
    qtype = T[name]
    start = kquants.unpack(gptq_quantize(w, hessian, qtype, imatrix), name)
    tuned = tune_blocks(w, damped(hessian), start, TuneSettings(iters=2))
    state = _Descent(w, damped(hessian), tuned, torch.device("cpu"))
    by_ggml = quants.dequantize(kquants.pack(tuned), qtype, w.shape[1])
    # the tuner works in float64, ggml's dequantization in float32: equal to float32 rounding
    np.testing.assert_allclose(by_ggml, state.dequantized().numpy(), rtol=2e-7, atol=1e-12)


@pytest.mark.parametrize("name", K_TYPES)
def test_tuning_lowers_the_loss_of_gptq_and_of_ggml(layer, name):
    w, hessian, imatrix = layer
    qtype = T[name]
    plain = loss(w, hessian, quants.quantize(w, qtype, imatrix), qtype)
    gptq = loss(w, hessian, gptq_quantize(w, hessian, qtype, imatrix), qtype)
    tuned = loss(w, hessian, tune_quantize(w, hessian, qtype, imatrix), qtype)
    assert tuned < gptq and tuned < 0.8 * plain


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q6_K"])
def test_converged_tuning_is_a_local_optimum_by_brute_force(layer, name):
    """No single move of a weight's q or a sub-block's scale or minimum by +-1, each tried on the packed
    integers and scored from ggml's dequantization, lowers the loss."""
    w, hessian, imatrix = layer
    w, hessian, imatrix = w[:6, :256], hessian[:256, :256], imatrix[:256]
    qtype, f = T[name], kquants.FORMATS[name]
    tuned = kquants.unpack(tune_quantize(w, hessian, qtype, imatrix, TuneSettings(iters=200, min_gain=0.0, exact=True)), name)
    best = loss(w, hessian, kquants.pack(tuned), qtype)
    fields = [("q", f.q_min, f.q_max), ("scales", f.scale_min, f.scale_max)]
    if f.has_min:
        fields.append(("mins", 0, f.min_max))
    tried = 0
    for field, low, high in fields:
        values = getattr(tuned, field)
        for index in np.ndindex(values.shape):
            for move in (-1, 1):
                if not low <= values[index] + move <= high:
                    continue
                values[index] += move
                moved = loss(w, hessian, kquants.pack(tuned), qtype)
                values[index] -= move
                tried += 1
                assert moved >= best * (1 - 1e-9), f"{field}{index} {move:+d} lowers the loss"
    assert tried > 256 * len(w)


def test_types_tuning_does_not_open_keep_gptq(layer):
    w, hessian, imatrix = layer
    assert not tunable(T.IQ1_M, 512) and not tunable(T.Q8_0, 512) and not tunable(T.Q4_K, 96)
    assert tunable(T.IQ2_XS, 512) and not tunable(T.IQ2_XS, 96)
    np.testing.assert_array_equal(tune_quantize(w, hessian, T.IQ1_M, imatrix),
                                  gptq_quantize(w, hessian, T.IQ1_M, imatrix))


@pytest.mark.parametrize("name", I_TYPES)
def test_iquant_scale_tuning_moves_only_the_scales_and_lowers_the_loss_of_gptq(layer, name):
    """Without the lattice moves (the default), the tuned bytes are GPTQ's codes with a new fp16 d and sub-block
    scales written in, and their loss (from ggml's dequantization) is below GPTQ's and ggml's alone."""
    w, hessian, imatrix = layer
    qtype = T[name]
    gptq = gptq_quantize(w, hessian, qtype, imatrix)
    tuned = tune_quantize(w, hessian, qtype, imatrix)
    opened = iquants.unpack(tuned, name)
    np.testing.assert_array_equal(
        iquants.pack(replace(iquants.unpack(gptq, name), d=opened.d, ls=opened.ls)).reshape(tuned.shape), tuned)
    assert loss(w, hessian, tuned, qtype) < loss(w, hessian, gptq, qtype)
    assert loss(w, hessian, tuned, qtype) < 0.8 * loss(w, hessian, quants.quantize(w, qtype, imatrix), qtype)


@pytest.mark.parametrize("name", tuple(iquants.LATTICES))
def test_lattice_tuning_lowers_the_loss_below_scale_tuning(layer, name):
    """Moving the grid points too (--tune-lattice) ends below the scales alone (the default), scored from
    ggml's dequantization of the bytes written, and every group is still a point of ggml's grid (unpack reads
    it)."""
    w, hessian, imatrix = layer
    qtype = T[name]
    scales_only = tune_quantize(w, hessian, qtype, imatrix)
    tuned = tune_quantize(w, hessian, qtype, imatrix, TuneSettings(lattice=True))
    assert loss(w, hessian, tuned, qtype) < 0.95 * loss(w, hessian, scales_only, qtype)
    iquants.LATTICES[name].points(iquants.unpack(tuned, name).v)


@pytest.mark.parametrize("name", tuple(iquants.LATTICES))
def test_converged_lattice_codes_are_a_local_optimum_by_brute_force(layer, name):
    """No group of 8 weights moved to any point its lattice offers (every grid point with its signs or delta,
    every sign pattern), tried in float64 on the tuned weights, lowers the loss of converged tuning."""
    w, hessian, imatrix = layer
    w, hessian, imatrix = w[:3, :256], hessian[:256, :256], imatrix[:256]
    qtype, lattice = T[name], iquants.LATTICES[name]
    tuned = iquants.unpack(tune_quantize(w, hessian, qtype, imatrix,
                                         TuneSettings(iters=200, min_gain=0.0, exact=True, lattice=True)), name)
    h = damped(hessian)
    step = np.repeat(tuned.d.astype(np.float64)[:, None] * tuned.fmt.multiplier(tuned.ls.astype(np.float64)),
                     tuned.fmt.sub_block, axis=1)                    # [rows, 256]: each weight's d * m(ls)
    for row in range(len(w)):
        e = w[row].astype(np.float64) - step[row] * tuned.v[row]
        best = e @ h @ e
        for first in range(0, 256, iquants.GROUP):
            group = slice(first, first + iquants.GROUP)
            families = lattice.families(torch.from_numpy(tuned.v[row, group].astype(np.float64))[None])
            points = torch.cat([p * (1 if m is None else m[0]) + (0 if o is None else o[0]) for p, _, m, o in
                                (tuple(t.double() if t is not None else None for t in f) for f in families)])
            moved = np.repeat(e[None], len(points), axis=0)
            moved[:, group] = w[row, group] - step[row, group] * points.numpy()
            assert np.min(np.einsum("kc,cd,kd->k", moved, h, moved)) >= best * (1 - 1e-9), (row, first)


@pytest.mark.parametrize("name", ["IQ2_XXS", "IQ1_S", "IQ4_XS"])
def test_converged_iquant_scales_are_a_local_optimum_by_brute_force(layer, name):
    """No single sub-block scale moved by +-1, tried on the packed bytes and scored from ggml's
    dequantization, lowers the loss of converged tuning."""
    w, hessian, imatrix = layer
    w, hessian, imatrix = w[:6, :256], hessian[:256, :256], imatrix[:256]
    qtype, f = T[name], iquants.FORMATS[name]
    tuned = iquants.unpack(tune_quantize(w, hessian, qtype, imatrix, TuneSettings(iters=200, min_gain=0.0, exact=True)), name)
    best = loss(w, hessian, iquants.pack(tuned), qtype)
    tried = 0
    for index in np.ndindex(tuned.ls.shape):
        for move in (-1, 1):
            if not 0 <= tuned.ls[index] + move <= f.scale_max:
                continue
            tuned.ls[index] += move
            moved = loss(w, hessian, iquants.pack(tuned), qtype)
            tuned.ls[index] -= move
            tried += 1
            assert moved >= best * (1 - 1e-9), f"ls{index} {move:+d} lowers the loss"
    assert tried >= len(w) * f.n_sub


def test_cli_defaults_are_tune_settings():
    from mc_gguf.cli import build_parser
    from mc_gguf.cli.common import tune_settings
    from mc_gguf.errors import InvalidValueError

    args = build_parser().parse_args(["quantize", "m", "--plan", "p", "-o", "o", "--tune"])
    assert tune_settings(args) == TuneSettings()
    args = build_parser().parse_args(["quantize", "m", "--plan", "p", "-o", "o", "--tune", "--tune-lattice"])
    assert tune_settings(args) == TuneSettings(lattice=True)
    args = build_parser().parse_args(["quantize", "m", "--plan", "p", "-o", "o", "--tune-lattice"])
    with pytest.raises(InvalidValueError, match="--tune-lattice"):
        tune_settings(args)


@pytest.fixture(scope="module")
def tuned_compress(tiny_model_dir, tmp_path_factory):
    from test_quantize import F32_NON_EXPERT

    from mc_gguf.calibrate.settings import CalibrationSettings
    from mc_gguf.calibrate.text import CalibrationText
    from mc_gguf.allocate.settings import AllocateSettings
    from mc_gguf.pipeline import compress
    from mc_gguf.settings import CompressSettings

    from conftest import CALIBRATION_TEXT

    folder = tmp_path_factory.mktemp("tuned")
    settings = CalibrationSettings(n_tokens=1024, seq_len=128, seed=5, types=("IQ2_XS", "Q2_K", "Q3_K", "Q4_K"))
    # the statistics kept, for the Hessians the test builds again
    settings = CompressSettings(calibration=settings, tune=TuneSettings(iters=3),
                                allocation=AllocateSettings(non_expert=F32_NON_EXPERT))
    return compress(tiny_model_dir, folder / "tuned.gguf", 3.0, CalibrationText("test", CALIBRATION_TEXT),
                    settings=settings, keep_artifacts=folder / "work", progress=False)


def test_compress_tune_writes_the_tuned_integers_and_llama_cpp_runs_them(tuned_compress, tiny_model_dir):
    """Every K-quant expert of the file is tune_quantize's output for it (so not GPTQ's alone; down's for the
    target the file's gate and up give it), the plan saw
    the tuned errors, and llama.cpp runs the file as transformers runs the checkpoint with its experts."""
    from test_quantize import TOLERANCE, dequantized_experts, with_experts
    from transformers import AutoModelForCausalLM

    from mc_gguf.gguf_io.edit import field_value
    from mc_gguf.hf.checkpoint import open_checkpoint
    from mc_gguf.quantize.hessian import ExpertHessians

    from helpers import llama_cpp_logits, transformers_logits

    result = tuned_compress
    reader = gguf.GGUFReader(result.path)
    assert field_value(reader, "mc.quantize.tune_iters") == 3
    assert set(result.plan.inputs["error_scale"]) == {"IQ2_XS", "Q2_K", "Q3_K", "Q4_K"}
    assert all(0 < r < 1 for r in result.plan.inputs["error_scale"].values())

    ckpt, stats = open_checkpoint(tiny_model_dir), result.stats
    hessians = ExpertHessians(ckpt, stats)
    experts = dequantized_experts(result.path)
    checked = 0
    for bid, layer in enumerate(result.plan.experts):
        for xid, types in enumerate(layer):
            for projection, name in types.items():
                if name not in kquants.FORMATS and name not in iquants.FORMATS:
                    continue
                which = "mid" if projection == "down" else "in"
                weights = ckpt.expert_weight(bid, xid, projection)
                hessian = hessians(bid, xid, which)
                if projection == "down":  # fit to the gate and up the file holds
                    target = hessians.down_target(bid, xid, [experts[bid, "gate"][xid], experts[bid, "up"][xid]])
                    weights, hessian = target.weights, target.hessian
                imatrix = stats.layers[bid].imatrix(which)[xid]
                tuned = tune_quantize(weights, hessian, T[name], imatrix, TuneSettings(iters=3))
                gptq = gptq_quantize(weights, hessian, T[name], imatrix)
                np.testing.assert_array_equal(experts[bid, projection][xid],
                                              quants.dequantize(tuned, T[name], weights.shape[1]))
                assert not np.array_equal(tuned, gptq)
                checked += 1
    assert checked >= 3

    import torch

    ids = list(range(1, 40))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    reference = transformers_logits(with_experts(model, experts), ids)
    got = llama_cpp_logits(result.path, ids, mu=0.0)
    assert np.abs(got - reference).max() / np.abs(reference).max() < TOLERANCE


def test_tuning_without_hessians_or_without_gptq_is_refused_before_writing(tiny_model_dir, tmp_path):
    from mc_gguf.allocate.allocation import uniform_plan
    from mc_gguf.errors import McGgufError
    from mc_gguf.hf.checkpoint import open_checkpoint
    from mc_gguf.quantize.quantization import quantize

    plan = uniform_plan(open_checkpoint(tiny_model_dir), "Q4_K")
    out = tmp_path / "out.gguf"
    with pytest.raises(McGgufError, match="tuning needs the experts' Hessians: calibrate with --hessian"):
        quantize(tiny_model_dir, plan, out, tune=TuneSettings(), progress=False)
    with pytest.raises(McGgufError, match="tuning starts from GPTQ"):
        quantize(tiny_model_dir, plan, out, gptq=False, tune=TuneSettings(), progress=False)
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["Q2_K", "IQ2_XS", "Q4_K", "IQ1_M"])
def test_a_shared_hessian_gives_the_bytes_of_a_fresh_one_and_is_factored_once(layer, name, monkeypatch):
    """One gptq.Hessian shared by GPTQ, tuning and every type (as compress shares it) gives each call the very
    bytes it gives on its own, and the inverse factor is computed once."""
    from mc_gguf.quantize import gptq

    w, hessian, imatrix = layer
    factored = []
    real = gptq.inverse_hessian_factor
    monkeypatch.setattr(gptq, "inverse_hessian_factor", lambda h, damp: factored.append(1) or real(h, damp))
    shared = gptq.Hessian(hessian)
    settings = TuneSettings(iters=2)
    for qtype in (T[name], T.Q3_K):
        np.testing.assert_array_equal(tune_quantize(w, shared, qtype, imatrix, settings),
                                      tune_quantize(w, hessian.copy(), qtype, imatrix, settings))
        np.testing.assert_array_equal(gptq_quantize(w, shared, qtype, imatrix), gptq_quantize(w, hessian, qtype, imatrix))
    assert len(factored) == 1 + 4  # the shared Hessian's, and each fresh call's own


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "IQ2_XS"])
def test_float32_products_reach_the_loss_of_exact_tuning(layer, name):
    """The sweep's one large product in float32 (the default) ends within 0.5% of the loss float64 reaches."""
    w, hessian, imatrix = layer
    qtype = T[name]
    fast = loss(w, hessian, tune_quantize(w, hessian, qtype, imatrix), qtype)
    exact = loss(w, hessian, tune_quantize(w, hessian, qtype, imatrix, TuneSettings(exact=True)), qtype)
    assert abs(fast - exact) <= 5e-3 * exact
