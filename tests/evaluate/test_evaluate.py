"""Perplexity and KL divergence computed from llama.cpp equal a direct computation from transformers."""

from __future__ import annotations

import math
import platform

import numpy as np
from scipy.special import log_softmax

from mc_gguf.evaluate.perplexity import reference_logits, score, scored_positions, windows
from mc_gguf.loader.model import load

from helpers import PROMPT, transformers_logits


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
    *_, scores = score(llm, token_windows, reference=reference_logits(ref, token_windows))
    summary = scores.summary()
    assert summary["kld_mean"] == 0.0 and summary["same_top_token"] == 1.0


def _eval_json(capsys, *argv: str) -> dict:
    import json

    from mc_gguf.cli import main

    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_command_matches_transformers(converted, hf_model, hf_tokenizer, tmp_path, capsys):
    text = PROMPT * 6
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    f32 = str(converted("f32"))
    report = _eval_json(capsys, f32, "--text", str(tmp_path / "text.txt"), "--ctx", "64", "--ref", f32)

    # independent reference: the Hugging Face tokenizer and model on the same windows
    token_windows = windows(hf_tokenizer(text, add_special_tokens=False).input_ids, 64, hf_tokenizer.bos_token_id)
    nll = []
    for window in token_windows:
        pos = scored_positions(len(window))
        logp = log_softmax(transformers_logits(hf_model, window).astype(np.float64)[pos], axis=-1)
        targets = window[pos.start + 1:pos.stop + 1]
        nll.extend(-logp[np.arange(len(targets)), targets])
    assert report["settings"]["windows"] == len(token_windows)
    assert report["tokens_scored"] == len(nll)
    assert abs(report["ppl"] - math.exp(np.mean(nll))) / math.exp(np.mean(nll)) < 2e-3
    assert report["kld_mean"] == 0.0 and report["same_top_token"] == 1.0
    # no pruning thresholds in the file: every slot runs, counted per layer
    slots = report["expert_slots"]
    assert slots["skipped"] == 0
    assert slots["computed"] == sum(r["computed"] for r in slots["per_layer"]) == len(token_windows) * 64 * 2 * 2


def test_eval_command_counts_pruned_slots(converted, tmp_path, capsys):
    (tmp_path / "text.txt").write_text(PROMPT * 3, encoding="utf-8")
    path = str(converted("f32"))
    common = ("--text", str(tmp_path / "text.txt"), "--ctx", "64")
    pruned = _eval_json(capsys, path, *common, "--mu", "0.9")["expert_slots"]
    assert pruned["skipped"] > 0
    assert all(r["computed"] + r["skipped"] == pruned["per_layer"][0]["computed"] + pruned["per_layer"][0]["skipped"]
               for r in pruned["per_layer"])
    assert _eval_json(capsys, path, *common, "--mu", "0.9", "--no-odp")["expert_slots"]["skipped"] == 0


def test_eval_command_refuses_a_text_shorter_than_one_window(converted, tmp_path, capsys):
    from mc_gguf.cli import main

    (tmp_path / "short.txt").write_text("Too short.", encoding="utf-8")
    assert main(["eval", str(converted("f32")), "--text", str(tmp_path / "short.txt"), "--ctx", "64"]) == 1
    assert "fewer than one window" in capsys.readouterr().err


def test_no_repack_computes_from_the_mapped_file(tiny_model_dir, hf_tokenizer, tmp_path):
    # llama.cpp's CPU backend copies the weights it has faster kernels for (Q4_K here) into its own layout, a
    # CPU_REPACK buffer of anonymous memory as large as those weights; --no-repack leaves them in the mapped file
    from mc_gguf.allocate.allocation import uniform_plan
    from mc_gguf.hf.checkpoint import open_checkpoint
    from mc_gguf.quantize.quantization import quantize

    path = quantize(tiny_model_dir, uniform_plan(open_checkpoint(tiny_model_dir), "Q4_K"), tmp_path / "q4.gguf",
                    progress=False)
    ids = hf_tokenizer(PROMPT * 3, add_special_tokens=False).input_ids
    token_windows = windows(ids, 64, hf_tokenizer.bos_token_id)
    packed = load(path, n_ctx=64, n_batch=64, logits_all=True)
    mapped = load(path, n_ctx=64, n_batch=64, logits_all=True, repack=False)
    if platform.machine() in ("x86_64", "AMD64"):  # ggml has repacked Q4_K kernels for AVX2 and up
        assert packed.model_buffers.get("CPU_REPACK", 0) > 0
    assert mapped.model_buffers and not any("REPACK" in name for name in mapped.model_buffers)
    assert mapped.model_buffers["CPU_Mapped"] == packed.model_buffers["CPU_Mapped"]  # the whole file, mapped
    # the same weights either way, through other kernels
    *_, scores = score(mapped, token_windows, reference=reference_logits(packed, token_windows))
    summary = scores.summary()
    assert summary["kld_mean"] < 1e-4 and summary["same_top_token"] > 0.98
