"""ODP with more than two experts per token (top-any): every slot after the first is kept iff its weight is at
least mu times the top weight, so a token keeps 1 to k experts; the runtime against the transformers reference."""

from __future__ import annotations

import numpy as np
import pytest
from test_odp import TOLERANCE, llama_run, per_expert_mu, reference, router_ratios, safe_median

from mc_gguf.gguf_io.convert import convert
from mc_gguf.hf.tiny import TinyMixtralSpec, build_tiny_mixtral
from mc_gguf.prune.calibration import write_odp_metadata
from mc_gguf.prune.rule import OdpParams, thresholds_for_skip_share

from helpers import PROMPT, transformers_logits

# (experts, experts per token)
ROUTINGS = {"top-4 of 8": (8, 4), "top-8 of 16": (16, 8)}


@pytest.fixture(scope="module", params=list(ROUTINGS))
def top_k_model(request, tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    n_expert, k = ROUTINGS[request.param]
    folder = tmp_path_factory.mktemp("top-k") / "model"
    build_tiny_mixtral(folder, TinyMixtralSpec(intermediate_size=256, num_local_experts=n_expert,
                                               num_experts_per_tok=k, seed=11))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(str(folder))(PROMPT).input_ids
    return folder, convert(folder, folder.parent / "f32.gguf", "f32", progress=False), model, ids


@pytest.mark.parametrize("protect_ratio", [0.0, 0.1])
def test_skip_counts_and_logits_match_the_reference(top_k_model, tmp_path, protect_ratio):
    folder, f32, model, ids = top_k_model
    k = model.config.num_experts_per_tok
    mu = [safe_median(r) for r in router_ratios(model, ids)]
    path = write_odp_metadata(f32, tmp_path / "odp.gguf", OdpParams(mu, protect_ratio))
    ref_logits, ref_counts = reference(model, ids, mu, protect_ratio)
    got_logits, got_counts = llama_run(path, ids)
    assert got_counts.computed == ref_counts.computed and got_counts.skipped == ref_counts.skipped
    # about half of the k-1 skippable slots go (the median of their ratios): tokens keep 1 to k experts
    assert 0.3 < ref_counts.skipped_share / ((k - 1) / k) < 0.6
    assert np.abs(got_logits - ref_logits).max() / np.abs(ref_logits).max() < TOLERANCE
    unpruned = transformers_logits(model, ids)
    assert np.abs(unpruned - ref_logits).max() / np.abs(ref_logits).max() > 10 * TOLERANCE


def test_decode_counts_match_the_reference_token_by_token(top_k_model, tmp_path):
    import torch

    from mc_gguf.prune.reference import TransformersOdp

    folder, f32, model, ids = top_k_model
    mu = [safe_median(r) for r in router_ratios(model, ids)]
    path = write_odp_metadata(f32, tmp_path / "odp.gguf", OdpParams(mu, 0.5))
    ids = ids[:12]
    with TransformersOdp(model, mu, 0.5) as odp, torch.no_grad():
        past = None
        for token in ids:
            past = model(torch.tensor([[token]]), past_key_values=past, use_cache=True).past_key_values
    _, got = llama_run(path, ids, n_batch=1, n_ubatch=1)
    assert got.computed == odp.counts.computed and got.skipped == odp.counts.skipped


@pytest.mark.parametrize("k", [2, 4, 8])
def test_quantile_thresholds_skip_the_share_of_all_slots(k):
    rng = np.random.default_rng(k)
    ratios = [np.sort(rng.uniform(size=(20_000, k - 1)), axis=1)[:, ::-1] ** p for p in (0.5, 1.0, 2.0)]
    target = 0.4 * (k - 1) / k
    for m, r in zip(thresholds_for_skip_share(ratios, target, n_used=k), ratios):
        assert (r < m).sum() / (r.shape[0] * k) == pytest.approx(target, abs=1e-3)


def test_per_expert_thresholds_match_the_reference(top_k_model, tmp_path):
    """mc.odp.mu_exps with k > 2: every slot after the first compared with its own expert's threshold (and the kept
    weights left as they are, mc.odp.renormalize false)."""
    folder, f32, model, ids = top_k_model
    mu_exps = per_expert_mu(model, ids, seed=3)
    odp = OdpParams.per_expert(mu_exps, 0.1, renormalize=False)
    path = write_odp_metadata(f32, tmp_path / "odp.gguf", odp)
    ref_logits, ref_counts = reference(model, ids, odp.mu, 0.1, mu_exps, renormalize=False)
    got_logits, got_counts = llama_run(path, ids)
    assert got_counts.computed == ref_counts.computed and got_counts.skipped == ref_counts.skipped
    assert sum(got_counts.skipped) > 0
    assert np.abs(got_logits - ref_logits).max() / np.abs(ref_logits).max() < TOLERANCE
