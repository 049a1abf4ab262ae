"""Perplexity and KL divergence computed from llama.cpp equal a direct computation from transformers."""

from __future__ import annotations

import math

import numpy as np
from scipy.special import log_softmax

from helpers import PROMPT, transformers_logits
from mc_gguf.evaluate import score, scored_positions, windows
from mc_gguf.run import load


def test_perplexity_matches_transformers(converted, hf_model, hf_tokenizer):
    ids = hf_tokenizer(PROMPT * 6, add_special_tokens=False).input_ids
    token_windows = windows(ids, 64, hf_tokenizer.bos_token_id)
    assert len(token_windows) >= 3
    llm = load(converted("f32"), n_ctx=64, n_batch=64, logits_all=True)
    *_, scores = score(llm, token_windows)

    nll = []
    for window in token_windows:
        logits = transformers_logits(hf_model, window).astype(np.float64)
        pos = scored_positions(len(window))
        logp = log_softmax(logits[pos], axis=-1)
        targets = window[pos.start + 1:pos.stop + 1]
        nll.extend(-logp[np.arange(len(targets)), targets])
    assert len(scores.nll) == len(nll) == len(token_windows) * 31
    # F16 KV cache (llama.cpp's default here) moves logits by ~1e-3
    assert abs(scores.perplexity()[0] - math.exp(np.mean(nll))) / math.exp(np.mean(nll)) < 2e-3


def test_kl_divergence_of_a_model_against_itself_is_zero(converted, hf_tokenizer):
    ids = hf_tokenizer(PROMPT * 3, add_special_tokens=False).input_ids
    token_windows = windows(ids, 64, hf_tokenizer.bos_token_id)
    llm = load(converted("q8_0"), n_ctx=64, n_batch=64, logits_all=True)
    ref = load(converted("q8_0"), n_ctx=64, n_batch=64, logits_all=True)
    *_, scores = score(llm, token_windows, reference=ref)
    summary = scores.summary()
    assert summary["kld_mean"] == 0.0 and summary["same_top_token"] == 1.0
