"""eps on a sample of an expert's intermediate features: the same quantized bytes, and the whole expert's error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mc_gguf.calibrate.quant_error import FEATURE_BLOCK, ExpertWeights, expert_errors, feature_sample
from mc_gguf.ggml import quants
from mc_gguf.ggml.types import CANDIDATES

HIDDEN, FF, TOKENS = 256, 2048, 384


@pytest.fixture(scope="module")
def expert():
    """A random expert with uneven input scales, its tokens, routing weights and importance matrices."""
    g = torch.Generator().manual_seed(11)
    w = ExpertWeights(torch.randn(FF, HIDDEN, generator=g) / HIDDEN ** 0.5,
                      torch.randn(FF, HIDDEN, generator=g) / HIDDEN ** 0.5,
                      torch.randn(HIDDEN, FF, generator=g) / FF ** 0.5)
    x = torch.randn(TOKENS, HIDDEN, generator=g) * (0.5 + torch.rand(HIDDEN, generator=g))
    route = torch.rand(TOKENS, generator=g)
    glu = lambda gate, up: torch.nn.functional.silu(gate) * up  # noqa: E731 - SwiGLU
    z = glu(x @ w.gate.T, x @ w.up.T)
    return w, x, route, glu, (x ** 2).sum(0).numpy(), (z ** 2).sum(0).numpy()


def test_feature_sample_is_whole_blocks_or_everything():
    rng = np.random.default_rng(0)
    sample = feature_sample(FF, 600, rng)
    assert len(sample) == 512 and (np.diff(sample) > 0).all()
    assert set(sample // FEATURE_BLOCK) == set(sample[::FEATURE_BLOCK] // FEATURE_BLOCK)  # whole blocks
    assert (sample[::FEATURE_BLOCK] % FEATURE_BLOCK == 0).all()
    for n_features, ff in ((0, FF), (FF, FF), (4096, FF), (200, FF), (512, 1000)):
        assert feature_sample(ff, n_features, rng) is None, (n_features, ff)


@pytest.mark.parametrize("name", list(CANDIDATES))
def test_sampled_columns_of_down_quantize_to_the_whole_rows_bytes(expert, name):
    """What makes the sample exact: ggml quantizes each block of 256 of a row on its own."""
    w, *_, imatrix_mid = expert
    qt = CANDIDATES[name]
    features = feature_sample(FF, 3 * FEATURE_BLOCK, np.random.default_rng(1))
    whole = quants.quantize(w.down.numpy(), qt.qtype, imatrix_mid)
    sampled = quants.quantize(w.down[:, features].numpy(), qt.qtype, imatrix_mid[features])
    bytes_per_block = FEATURE_BLOCK // qt.block_size * qt.type_size
    blocks = np.unique(features // FEATURE_BLOCK)
    expected = np.concatenate([whole[:, b * bytes_per_block:(b + 1) * bytes_per_block] for b in blocks], axis=1)
    np.testing.assert_array_equal(sampled, expected)


def test_sampled_eps_estimates_the_full_pass(expert):
    """A quarter of the features, three seeds: every type's error within 5% of the full pass, order kept."""
    w, x, route, act, imatrix_in, imatrix_mid = expert
    types = list(CANDIDATES)
    full = expert_errors(w, x, route, act, types, imatrix_in, imatrix_mid)
    for seed in range(3):
        features = feature_sample(FF, FF // 4, np.random.default_rng(seed))
        sampled = expert_errors(w, x, route, act, types, imatrix_in, imatrix_mid, features)
        np.testing.assert_allclose(sampled, full, rtol=0.05)
        # the types rank as the full pass ranks them, wherever the full pass tells them apart by 10%
        for row in range(3):
            order = np.argsort(full[row])
            apart = full[row][order][1:] > 1.1 * full[row][order][:-1]
            assert (np.diff(sampled[row][order])[apart] > 0).all()


def test_all_features_sampled_is_the_full_pass(expert):
    w, x, route, act, imatrix_in, imatrix_mid = expert
    types = ["Q2_K", "Q4_K"]
    full = expert_errors(w, x, route, act, types, imatrix_in, imatrix_mid)
    every = expert_errors(w, x, route, act, types, imatrix_in, imatrix_mid, np.arange(FF))
    np.testing.assert_array_equal(every, full)


def test_iquants_on_a_quarter_of_the_blocks_by_the_k_quants_ratio_estimate_the_whole(expert):
    """An expert whose feature blocks differ in scale (as trained experts' do): the i-quants measured on a
    quarter of the blocks and scaled by the nearest K-quant's ratio are within 5% of the whole measurement,
    the K-quants are the whole measurement itself, and the ratio does what scaling by the share alone cannot."""
    from mc_gguf.calibrate.quant_error import RATIO_REFERENCE

    w, x, route, act, imatrix_in, imatrix_mid = expert
    block_scale = torch.tensor([0.2, 3.0, 0.5, 1.0, 2.0, 0.3, 1.5, 0.8]).repeat_interleave(FEATURE_BLOCK)
    uneven = ExpertWeights(w.gate * block_scale[:, None], w.up, w.down * block_scale[None, :])
    types = list(CANDIDATES)
    whole = expert_errors(uneven, x, route, act, types, imatrix_in, imatrix_mid)
    quarter = expert_errors(uneven, x, route, act, types, imatrix_in, imatrix_mid, iquant_share=4)
    for t, name in enumerate(types):
        if name in RATIO_REFERENCE:
            np.testing.assert_allclose(quarter[:, t], whole[:, t], rtol=0.05, err_msg=name)
        else:
            np.testing.assert_array_equal(quarter[:, t], whole[:, t])
    # scaled by the share alone, the same quarter of blocks misses by far more
    part = np.concatenate([np.arange(b * FEATURE_BLOCK, (b + 1) * FEATURE_BLOCK) for b in (0, 4)])
    share_only = expert_errors(uneven, x, route, act, ["IQ2_XS"], imatrix_in, imatrix_mid, part)
    t = types.index("IQ2_XS")
    assert np.abs(share_only[:, 0] / whole[:, t] - 1).max() > 0.15
