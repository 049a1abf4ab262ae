"""Perplexity and KL divergence the way llama.cpp's llama-perplexity measures them.

Protocol (llama-perplexity's): the token stream is cut into non-overlapping
windows of ``n_ctx`` tokens, the first token of each replaced by BOS; the
logits at positions n_ctx/2 .. n_ctx-2 score the next token, so each window
scores n_ctx/2 - 1 tokens and every token is predicted with at least n_ctx/2
tokens of context. Perplexity is exp(mean NLL), its standard error the delta
method's exp(mean) * std(NLL) / sqrt(n). KL divergence is per scored token,
KL(reference || model), over the full vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import log_softmax


def windows(token_ids: Sequence[int], n_ctx: int, bos_id: int, max_windows: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of n_ctx tokens, each starting with BOS."""
    count = len(token_ids) // n_ctx
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"the text has {len(token_ids)} tokens, fewer than one window of {n_ctx}")
    out = []
    for w in range(count):
        chunk = list(token_ids[w * n_ctx:(w + 1) * n_ctx])
        chunk[0] = bos_id
        out.append(chunk)
    return out


def scored_positions(n_ctx: int) -> slice:
    return slice(n_ctx // 2, n_ctx - 1)


def window_log_probs(llm, window: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities at the scored positions [n, vocab] and the tokens they predict [n]."""
    llm.reset()
    llm.eval(window)
    pos = scored_positions(len(window))
    logits = np.asarray(llm.scores[pos], dtype=np.float64)
    targets = np.asarray(window[pos.start + 1:pos.stop + 1])
    return log_softmax(logits, axis=-1), targets


@dataclass
class Scores:
    nll: list[float]
    kld: list[float]
    same_top: list[bool]

    def perplexity(self) -> tuple[float, float]:
        nll = np.asarray(self.nll)
        ppl = math.exp(nll.mean())
        return ppl, ppl * nll.std(ddof=1) / math.sqrt(len(nll))

    def summary(self) -> dict:
        ppl, err = self.perplexity()
        out = {"tokens_scored": len(self.nll), "ppl": ppl, "ppl_stderr": err}
        if self.kld:
            kld = np.asarray(self.kld)
            out.update(kld_mean=float(kld.mean()), kld_p99=float(np.percentile(kld, 99)),
                       same_top_token=float(np.mean(self.same_top)))
        return out


def score(llm, token_windows: list[list[int]], reference=None) -> Iterator[Scores]:
    """Yield cumulative scores after each window; with ``reference`` (another Llama) also KLD and top-1 agreement."""
    scores = Scores([], [], [])
    for window in token_windows:
        logp, targets = window_log_probs(llm, window)
        scores.nll.extend((-logp[np.arange(len(targets)), targets]).tolist())
        if reference is not None:
            ref_logp, _ = window_log_probs(reference, window)
            scores.kld.extend((np.exp(ref_logp) * (ref_logp - logp)).sum(-1).tolist())
            scores.same_top.extend((ref_logp.argmax(-1) == logp.argmax(-1)).tolist())
        yield scores
