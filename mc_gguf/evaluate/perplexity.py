"""Perplexity and KL divergence the way llama.cpp's llama-perplexity measures them.

Protocol (llama-perplexity's): the token stream is cut into non-overlapping
windows of ``n_ctx`` tokens, the first token of each replaced by BOS; the
logits at positions n_ctx/2 .. n_ctx-2 score the next token, so each window
scores n_ctx/2 - 1 tokens and every token is predicted with at least n_ctx/2
tokens of context. Perplexity is exp(mean NLL), its standard error the delta
method's exp(mean) * std(NLL) / sqrt(n). KL divergence is per scored token,
KL(reference || model), over the full vocabulary.

``evaluate_gguf`` is what ``mc-gguf eval`` runs: the text is tokenized by the
model's own vocabulary (no BOS added; each window's first token becomes BOS),
and the runtime's slot counters give the expert slots computed and skipped.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.special import log_softmax
from tqdm import tqdm

from mc_gguf.atomic import reserve_space
from mc_gguf.errors import McGgufError


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


def scored_logits(llm, window: list[int]) -> np.ndarray:
    """The logits at the window's scored positions [n, vocab], float32 as llama.cpp returns them."""
    llm.reset()
    llm.eval(window)
    return np.asarray(llm.scores[scored_positions(len(window))], dtype=np.float32)


def window_log_probs(llm, window: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities at the scored positions [n, vocab] and the tokens they predict [n]."""
    pos = scored_positions(len(window))
    targets = np.asarray(window[pos.start + 1:pos.stop + 1])
    return log_softmax(scored_logits(llm, window).astype(np.float64), axis=-1), targets


def reference_logits(reference, token_windows: list[list[int]], *, progress: bool = False) -> np.ndarray:
    """The reference's logits at every window's scored positions [windows, n, vocab], on disk.

    As llama-perplexity's --kl-divergence-base, the reference is scored first and
    its logits kept, so that only one model is in memory at a time: they go to
    an anonymous temporary file (deleted when closed, even after a crash),
    memory-mapped; 16 windows of 512 tokens at a 32,000-token vocabulary are 0.5 GB.
    """
    n_scored = len(range(*scored_positions(len(token_windows[0])).indices(len(token_windows[0]))))
    shape = (len(token_windows), n_scored, reference.n_vocab())
    backing = tempfile.TemporaryFile()
    reserve_space(backing, 4 * math.prod(shape), f"the reference's logits ({tempfile.gettempdir()})")
    store = np.memmap(backing, dtype=np.float32, mode="w+", shape=shape)
    for w, window in enumerate(tqdm(token_windows, desc="reference", unit="window", disable=not progress,
                                    dynamic_ncols=True)):
        store[w] = scored_logits(reference, window)
    return store


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
            same_top = np.asarray(self.same_top, dtype=np.float64)
            out.update(kld_mean=float(kld.mean()), kld_stderr=float(kld.std(ddof=1) / math.sqrt(len(kld))),
                       kld_median=float(np.median(kld)), kld_p99=float(np.percentile(kld, 99)),
                       same_top_token=float(same_top.mean()),
                       same_top_token_stderr=float(same_top.std(ddof=1) / math.sqrt(len(same_top))))
        return out


def score(llm, token_windows: list[list[int]], reference: np.ndarray | None = None) -> Iterator[Scores]:
    """Yield cumulative scores after each window; with ``reference`` (reference_logits of the same windows)
    also KLD and top-1 agreement."""
    scores = Scores([], [], [])
    for w, window in enumerate(token_windows):
        logp, targets = window_log_probs(llm, window)
        scores.nll.extend((-logp[np.arange(len(targets)), targets]).tolist())
        if reference is not None:
            ref_logp = log_softmax(reference[w].astype(np.float64), axis=-1)
            scores.kld.extend((np.exp(ref_logp) * (ref_logp - logp)).sum(-1).tolist())
            scores.same_top.extend((ref_logp.argmax(-1) == logp.argmax(-1)).tolist())
        yield scores


@dataclass(frozen=True)
class EvalSettings:
    n_ctx: int = 512
    max_windows: int | None = None
    odp: bool = True
    mu: float | None = None
    rpc: tuple[str, ...] = ()  # patched rpc-servers (HOST:PORT) to run the layers on
    repack: bool = True        # False: llama.cpp's --no-repack (run.load), both models
    # llama.cpp's threads and placement (run.load's keywords), both models
    n_threads: int | None = None
    n_threads_batch: int | None = None
    n_gpu_layers: int | None = None  # None: load's default
    cpu_moe: bool = False
    n_cpu_moe: int = 0
    override_tensor: tuple[str, ...] = ()


def evaluate_gguf(model: str | Path, text: str, *, ref: str | Path | None = None,
                  settings: EvalSettings = EvalSettings(), progress: bool = True) -> dict:
    """Perplexity (and with ``ref`` KL divergence and top-1 agreement) of a GGUF on ``text``, with expert slot counts.

    The reference always runs unpruned; the model prunes as its file says unless
    ``settings.odp`` is False (``settings.mu`` overrides the thresholds).
    """
    from mc_gguf.loader.model import load
    from mc_gguf.gguf_io.validate import check_model, tokenizer_difference

    if settings.n_ctx < 4 or settings.n_ctx % 2:
        raise McGgufError(f"--ctx {settings.n_ctx}: the window must be an even number of at least 4 tokens")
    # a file that is no model, or a reference with another tokenizer, fails now, not after the reference pass
    headers = [check_model(path) for path in ((model, ref) if ref is not None else (model,))]
    if ref is not None:
        difference = tokenizer_difference(*headers)
        if difference:
            raise McGgufError(f"{ref} and {model} have different tokenizers ({difference}): the reference must "
                              "share the model's tokenizer")
    del headers
    llm_kwargs = dict(n_ctx=settings.n_ctx, n_batch=settings.n_ctx, logits_all=True, rpc=settings.rpc,
                      repack=settings.repack, n_threads=settings.n_threads, n_threads_batch=settings.n_threads_batch,
                      n_gpu_layers=settings.n_gpu_layers, cpu_moe=settings.cpu_moe, n_cpu_moe=settings.n_cpu_moe,
                      override_tensor=settings.override_tensor)
    ref_logits = None
    if ref is not None:  # the reference first, alone in memory; its logits wait on disk
        reference = load(ref, odp=False, **llm_kwargs)
        ref_ids = reference.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        ref_logits = reference_logits(reference, _windows(ref_ids, settings, reference.token_bos()),
                                      progress=progress)
        reference.close()
        del reference
    llm = load(model, odp=settings.odp, mu=settings.mu, **llm_kwargs)
    token_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    token_windows = _windows(token_ids, settings, llm.token_bos())
    if ref_logits is not None and ref_logits.shape[-1] != llm.n_vocab():
        raise McGgufError(f"{ref} has a vocabulary of {ref_logits.shape[-1]} tokens, {model} of {llm.n_vocab()}: "
                          "the reference must share the model's tokenizer")
    if ref_logits is not None and ref_ids != token_ids:
        raise McGgufError(f"{ref} and {model} tokenize the text differently: the reference must share the "
                          "model's tokenizer")

    llm.reset_expert_stats()
    result = Scores([], [], [])
    bar = tqdm(score(llm, token_windows, ref_logits), total=len(token_windows), desc="evaluating",
               unit="window", disable=not progress, dynamic_ncols=True)
    for result in bar:
        bar.set_postfix_str(f"PPL {math.exp(np.mean(result.nll)):.3f}")
    counts = llm.expert_stats()
    per_layer = [{"layer": il, "computed": c, "skipped": s, "skipped_share": s / (c + s) if c + s else 0.0}
                 for il, (c, s) in enumerate(zip(counts.computed, counts.skipped))]
    return {
        "model": str(model), "reference": str(ref) if ref is not None else None,
        "settings": {**asdict(settings), "windows": len(token_windows), "text_tokens": len(token_ids)},
        **result.summary(),
        "expert_slots": {"computed": sum(counts.computed), "skipped": sum(counts.skipped),
                         "skipped_share": counts.skipped_share, "per_layer": per_layer},
    }


def _windows(token_ids: list[int], settings: EvalSettings, bos_id: int) -> list[list[int]]:
    try:
        return windows(token_ids, settings.n_ctx, bos_id, settings.max_windows)
    except ValueError as exc:
        raise McGgufError(str(exc)) from None


def describe_eval(report: dict, per_layer: bool = False) -> str:
    """The short readable table ``mc-gguf eval`` prints."""
    s = report["settings"]
    lines = [f"{report['model']}: {s['windows']} windows of {s['n_ctx']} tokens, {report['tokens_scored']} scored"
             f" (second half of each window), ODP {'on' if s['odp'] else 'off'}",
             f"  perplexity        {report['ppl']:.4f} +/- {report['ppl_stderr']:.4f}"]
    if report["reference"]:
        lines += [f"  KL divergence     {report['kld_mean']:.6f} +/- {report['kld_stderr']:.6f}  (vs {report['reference']})",
                  f"  KLD median / 99%  {report['kld_median']:.6f} / {report['kld_p99']:.6f}",
                  f"  same top token    {100 * report['same_top_token']:.2f} +/- "
                  f"{100 * report['same_top_token_stderr']:.2f} %"]
    slots = report["expert_slots"]
    lines.append(f"  expert slots      {slots['computed']} computed, {slots['skipped']} skipped "
                 f"({100 * slots['skipped_share']:.1f}%)")
    if per_layer:
        lines.append("  layer   computed    skipped  skipped %")
        lines += [f"  {r['layer']:5d} {r['computed']:10d} {r['skipped']:10d} {100 * r['skipped_share']:9.1f}"
                  for r in slots["per_layer"]]
    return "\n".join(lines)
