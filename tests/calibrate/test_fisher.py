"""The Fisher information the streamed calibration measures equals transformers' own backward through the whole
model, and the allocation spends bits where it is high.

Reference: the whole transformers model on the kept sequences, the log-probabilities of the same drawn tokens
(fisher.sample_labels on its own logits) summed, and autograd's gradients with respect to the residual stream
at the input of each layer's norm before its MoE block and at each layer's output (the next layer's input, the
final norm's for the last), squared and averaged per token and dimension. The families' test is in
test_family_routing.py (their calibrations are made there).
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch

from mc_gguf.allocate.allocation import allocate
from mc_gguf.allocate.cost import COMPRESS_COST, significance_cost
from mc_gguf.calibrate.calibration import calibrate
from mc_gguf.calibrate.fisher import sample_labels
from mc_gguf.calibrate.stats import EPS_EXPERT, Fisher, StatsFileError, load_stats
from mc_gguf.calibrate.text import CalibrationText, pack_sequences
from mc_gguf.ggml.types import quant_type
from mc_gguf.hf.checkpoint import open_checkpoint

from conftest import CALIBRATION_TEXT


def transformers_fisher(model, folder, settings) -> Fisher:
    """The reference Fisher of ``model`` on the sequences the calibration keeps with ``settings``."""
    from transformers import AutoTokenizer

    ckpt = open_checkpoint(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer(CALIBRATION_TEXT, add_special_tokens=False).input_ids
    sequences = pack_sequences(ids, tokenizer.bos_token_id, settings.n_tokens, settings.seq_len, settings.seed)
    n_seq, length = sequences.shape
    kept = min(n_seq, -(-settings.fisher_tokens // length))
    layers = model.model.layers
    mid, out = np.zeros(len(layers)), np.zeros(len(layers))
    for i in range(kept):
        seen = {}
        hooks = [getattr(layer, ckpt.arch.moe_input_norm).register_forward_pre_hook(
                 lambda m, a, bid=bid: seen.__setitem__(("mid", bid), a[0])) for bid, layer in enumerate(layers)]
        hooks += [(layers[bid + 1].input_layernorm if bid + 1 < len(layers) else model.model.norm)
                  .register_forward_pre_hook(lambda m, a, bid=bid: seen.__setitem__(("out", bid), a[0]))
                  for bid in range(len(layers))]
        try:
            logits = model(torch.from_numpy(sequences[i:i + 1])).logits[0].float()
        finally:
            for hook in hooks:
                hook.remove()
        labels = sample_labels(logits, settings.seed + i)
        log_p = torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).sum()
        points = sorted(seen)
        grads = torch.autograd.grad(log_p, [seen[p] for p in points])
        for (where, bid), grad in zip(points, grads):
            (mid if where == "mid" else out)[bid] += float((grad.double() ** 2).sum())
    scale = kept * length * model.config.hidden_size
    return Fisher(mid=mid / scale, out=out / scale)


@pytest.fixture(scope="module")
def fisher_settings(calibration_settings):
    return replace(calibration_settings, fisher_tokens=4096)


@pytest.fixture(scope="module")
def calibration(tiny_model_dir, tmp_path_factory, fisher_settings):
    """(stats path, stats) of the tiny model calibrated with the Fisher information measured."""
    path = tmp_path_factory.mktemp("fisher") / "tiny.stats"
    return path, calibrate(tiny_model_dir, path, CalibrationText("test text", CALIBRATION_TEXT), fisher_settings,
                           progress=False)


def assert_same_fisher(got: Fisher, expected: Fisher) -> None:
    np.testing.assert_allclose(got.mid, expected.mid, rtol=1e-4)
    np.testing.assert_allclose(got.out, expected.out, rtol=1e-4)


def test_the_fisher_information_is_transformers_backward(calibration, hf_model, tiny_model_dir, fisher_settings):
    _, stats = calibration
    assert stats.fisher is not None
    assert_same_fisher(stats.fisher, transformers_fisher(hf_model, tiny_model_dir, fisher_settings))
    # the points differ: a weighting that is not all ones
    assert np.ptp(np.concatenate([stats.fisher.mid, stats.fisher.out])) > 0


def test_the_fisher_information_is_saved_and_read_back(calibration):
    path, stats = calibration
    loaded = load_stats(path)
    np.testing.assert_array_equal(loaded.fisher.mid, stats.fisher.mid)
    np.testing.assert_array_equal(loaded.fisher.out, stats.fisher.out)


@pytest.mark.parametrize("damage", ["one missing", "wrong length", "negative", "nan", "all zero"])
def test_a_damaged_fisher_information_is_refused(calibration, tmp_path, damage):
    _, stats = calibration
    mid, out = stats.fisher.mid.copy(), stats.fisher.out.copy()
    if damage == "wrong length":
        mid = mid[:-1]
    elif damage == "negative":
        out[0] = -1.0
    elif damage == "nan":
        mid[1] = np.nan
    elif damage == "all zero":
        mid[:], out[:] = 0.0, 0.0
    damaged = replace(stats, fisher=Fisher(mid, out))
    damaged.tensors = {}  # their Hessians are read from the fixture's file: not what this test is about
    path = tmp_path / "damaged.stats"
    damaged.save(path)
    if damage == "one missing":
        from safetensors import safe_open
        from safetensors.numpy import load_file, save_file

        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata()
        arrays = load_file(str(path))
        del arrays["fisher.out"]
        save_file(arrays, str(path), metadata=metadata)
    with pytest.raises(StatsFileError, match="(?i)fisher"):
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
    assert allocate(stats, 3.0, model_dir=tiny_model_dir).inputs["fisher"] is False


def test_the_weighted_stock_plan_is_the_brute_force_optimum(calibration, tiny_model_dir):
    """Every layer's eps times sqrt(tr(F)/H after the layer over the mean of every point's), recomputed here: the
    program's plan is the brute-force optimum of those costs over one type per layer."""
    _, stats = calibration
    fisher = stats.fisher
    mean = np.concatenate([fisher.mid, fisher.out]).mean()
    plan = allocate(stats, 3.0, model_dir=tiny_model_dir, layout="stock")
    bpw = np.array([quant_type(t).bits_per_weight for t in stats.types])
    layer_cost = [significance_cost(layer.phi, layer.w, layer.eps[EPS_EXPERT] * np.sqrt(fisher.out[il] / mean))
                  .sum(axis=0) for il, layer in enumerate(stats.layers)]
    best = min(sum(layer_cost[il][t] for il, t in enumerate(choice))
               for choice in itertools.product(range(len(bpw)), repeat=len(stats.layers))
               if bpw[list(choice)].mean() <= 3.0)
    chosen = [stats.types.index(layer[0]["gate"]) for layer in plan.experts]
    assert plan.inputs["cost"] == pytest.approx(best)
    assert sum(layer_cost[il][t] for il, t in enumerate(chosen)) == pytest.approx(best)
    assert plan.inputs["fisher"] is True
