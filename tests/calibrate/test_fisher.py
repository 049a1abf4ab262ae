"""The Fisher information the streamed calibration measures equals transformers' own backward through the whole
model (helpers.transformers_fisher; the other families' test is in test_family_routing.py, where their
calibrations are made), the statistics file keeps it and refuses it damaged, and the allocation prices each cost
by it where its error is measured.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from mc_gguf.allocate.allocation import allocate
from mc_gguf.allocate.cost import COMPRESS_COST, significance_cost
from mc_gguf.calibrate.calibration import calibrate
from mc_gguf.calibrate.stats import EPS_EXPERT, Fisher, StatsFileError, load_stats
from mc_gguf.calibrate.text import CalibrationText
from mc_gguf.ggml.types import quant_type

from conftest import CALIBRATION_TEXT
from helpers import assert_same_fisher, transformers_fisher


@pytest.fixture(scope="module")
def fisher_settings(calibration_settings):
    return replace(calibration_settings, fisher_tokens=384)  # the first 3 of 8 sequences


@pytest.fixture(scope="module")
def calibration(tiny_model_dir, tmp_path_factory, fisher_settings):
    """(stats path, stats) of the tiny model calibrated with the Fisher information measured."""
    path = tmp_path_factory.mktemp("fisher") / "tiny.stats"
    return path, calibrate(tiny_model_dir, path, CalibrationText("test text", CALIBRATION_TEXT), fisher_settings,
                           progress=False)


def test_the_fisher_information_is_transformers_backward(calibration, hf_model, tiny_model_dir, fisher_settings):
    _, stats = calibration
    assert stats.fisher is not None
    assert stats.info["fisher_tokens"] == 384
    assert_same_fisher(stats.fisher, transformers_fisher(hf_model, tiny_model_dir, fisher_settings, CALIBRATION_TEXT))
    # the points differ: a weighting that is not all ones
    assert np.ptp(np.concatenate([stats.fisher.mid, stats.fisher.out])) > 0


def test_the_fisher_information_is_saved_and_read_back(calibration):
    path, stats = calibration
    loaded = load_stats(path)
    np.testing.assert_array_equal(loaded.fisher.mid, stats.fisher.mid)
    np.testing.assert_array_equal(loaded.fisher.out, stats.fisher.out)


@pytest.mark.parametrize("damage", [None, "one missing", "wrong length", "negative", "nan", "one zero", "integer"])
def test_a_damaged_fisher_information_is_refused(calibration, tmp_path, damage):
    """The statistics saved with their Fisher information changed (without their routing and Hessians, which the
    file would otherwise need its MoE inputs for): intact it loads as it was, damaged it is refused for it."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    _, stats = calibration
    mid, out = stats.fisher.mid.copy(), stats.fisher.out.copy()
    if damage == "wrong length":
        mid = mid[:-1]
    elif damage == "negative":
        out[0] = -1.0
    elif damage == "nan":
        mid[1] = np.nan
    elif damage == "one zero":
        out[-1] = 0.0
    layers = [replace(layer, routed_ids=None, routed_weights=None) for layer in stats.layers]
    path = tmp_path / "stats"
    replace(stats, layers=layers, tensors={}, fisher=Fisher(mid, out)).save(path)
    if damage in ("one missing", "integer"):
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata()
        arrays = load_file(str(path))
        if damage == "one missing":
            del arrays["fisher.out"]
        else:
            arrays["fisher.mid"] = arrays["fisher.mid"].astype(np.int64)
        save_file(arrays, str(path), metadata=metadata)
    if damage is None:
        np.testing.assert_array_equal(load_stats(path).fisher.out, out)
        return
    with pytest.raises(StatsFileError, match=r": fisher\.(mid|out) (is|holds) "):
        load_stats(path)


def test_the_layer_that_is_felt_more_gets_more_bits(calibration, tiny_model_dir):
    """The same statistics with layer 0's experts made 100 times as sensitive as the others: layer 0 gets more of
    the same budget; without Fisher information the plan is the one the errors alone give."""
    _, stats = calibration
    n = len(stats.layers)
    flat = Fisher(mid=np.ones(n), out=np.ones(n))
    first = Fisher(mid=np.ones(n), out=np.r_[100.0, np.ones(n - 1)])

    def layer_bits(fisher):
        plan = allocate(replace(stats, fisher=fisher), 3.0, model_dir=tiny_model_dir, **COMPRESS_COST)
        return np.nanmean(plan.expert_bits(), axis=1)

    flat_bits, first_bits, none_bits = (layer_bits(s) for s in (flat, first, None))
    assert first_bits[0] > flat_bits[0]
    assert np.mean(first_bits[1:]) < np.mean(flat_bits[1:])
    np.testing.assert_allclose(none_bits, flat_bits)


def test_the_default_measures_none(tiny_model_dir, tmp_path, calibration_settings):
    settings = replace(calibration_settings, n_tokens=256, seq_len=64, types=("Q2_K", "Q4_K"), tensor_types=(),
                       hessian=False)
    assert settings.fisher_tokens == 0
    stats = calibrate(tiny_model_dir, tmp_path / "s.stats", CalibrationText("t", CALIBRATION_TEXT), settings,
                      progress=False)
    assert stats.fisher is None and load_stats(tmp_path / "s.stats").fisher is None
    assert "fisher" not in allocate(stats, 3.0, model_dir=tiny_model_dir).inputs


def test_the_weighted_stock_plan_is_the_brute_force_optimum(calibration, tiny_model_dir):
    """Every layer's cost (the authors' exponents: eps to the power 1) times tr(F)/H after the layer over the mean
    of every point's, recomputed here: the program's plan is the brute-force optimum of those costs over one type per
    layer."""
    _, stats = calibration
    fisher = stats.fisher
    mean = np.concatenate([fisher.mid, fisher.out]).mean()
    plan = allocate(stats, 3.0, model_dir=tiny_model_dir, layout="stock")
    bpw = np.array([quant_type(t).bits_per_weight for t in stats.types])
    layer_cost = [significance_cost(layer.phi, layer.w, layer.eps[EPS_EXPERT]).sum(axis=0) * fisher.out[il] / mean
                  for il, layer in enumerate(stats.layers)]
    best = min(sum(layer_cost[il][t] for il, t in enumerate(choice))
               for choice in itertools.product(range(len(bpw)), repeat=len(stats.layers))
               if bpw[list(choice)].mean() <= 3.0)
    chosen = [stats.types.index(layer[0]["gate"]) for layer in plan.experts]
    assert plan.inputs["cost"] == pytest.approx(best)
    assert sum(layer_cost[il][t] for il, t in enumerate(chosen)) == pytest.approx(best)
    assert plan.inputs["fisher"] is True


def test_without_tensor_types_the_last_layer_is_kept_for_it(tiny_model_dir, tmp_path, fisher_settings, hf_model):
    """No other tensors measured (the last layer's output is then kept for the Fisher information alone), one
    sequence of four: still transformers' backward."""
    settings = replace(fisher_settings, n_tokens=512, tensor_types=(), hessian=False, types=("Q4_K",),
                       fisher_tokens=100)
    stats = calibrate(tiny_model_dir, tmp_path / "s.stats", CalibrationText("t", CALIBRATION_TEXT), settings,
                      progress=False)
    assert stats.info["fisher_tokens"] == 128
    assert_same_fisher(stats.fisher, transformers_fisher(hf_model, tiny_model_dir, settings, CALIBRATION_TEXT))


def test_each_tensor_is_priced_where_its_error_is_measured():
    fisher = Fisher(mid=np.array([1.0, 2.0, 3.0]), out=np.array([10.0, 20.0, 30.0]))
    assert fisher.point("token_embd.weight") == 10.0       # the first layer's output
    assert fisher.point("output.weight") == 30.0           # the final norm's input
    assert fisher.point("blk.1.attn_q.weight") == 2.0      # after the layer's attention
    assert fisher.point("blk.2.attn_kv_a_mqa.weight") == 3.0
    assert fisher.point("blk.1.ffn_down_exps") == 20.0     # after the layer
    assert fisher.point("blk.0.ffn_up_shexp.weight") == 10.0
    assert fisher.relative(11.0) == pytest.approx(1.0)
