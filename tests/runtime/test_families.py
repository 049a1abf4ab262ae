"""The per-expert layout and ODP in other MoE families' graphs (Qwen2-MoE with its shared expert, Qwen3-MoE, OLMoE,
DeepSeek-V2 with its dense first layer and shared expert).

Each family's tiny seeded checkpoint is built with transformers and converted
by llama.cpp's own convert_hf_to_gguf.py from the pinned sdist (with its own
gguf-py, gguf_io/llama_convert.py). The families' BPE tokenizers cannot be
had offline, so these checkpoints carry Mixtral's SentencePiece tokenizer and
the converter reads it with its SentencePiece reader; the tokenizer is not
what is tested here. The
checks: the converted file runs in the patched runtime as transformers runs the
checkpoint; its experts split into groups (same bytes, mc.experts.groups)
give exactly the stacked file's logits, on the CPU's grouped op and on the
group-by-group graph, with and without ODP, which skips the same slots.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mc_gguf.gguf_io.llama_convert import run_converter
from mc_gguf.gguf_io.regroup import regroup_experts
from mc_gguf.hf.tiny import TINY_FAMILIES, build_tiny_family

from helpers import PROMPT, llama_cpp_logits, transformers_logits

HELPERS = Path(__file__).parent.parent / "helpers.py"

PARTITION = {0: [1, 3, 5, 7], 1: [0, 2], 2: [4, 6]}
DOWN_PARTITION = {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}

@pytest.fixture(scope="module", params=list(TINY_FAMILIES))
def family(request, tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_tiny_family(request.param, tmp_path_factory.mktemp(request.param) / "model")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(str(folder))(PROMPT).input_ids
    stacked = run_converter(folder, folder.parent / "f32.gguf", TINY_FAMILIES[request.param][1], "f32")
    grouped = regroup_experts(stacked, folder.parent / "grouped.gguf", PARTITION, DOWN_PARTITION)
    return model, ids, stacked, grouped


def test_the_converted_file_runs_as_transformers_runs_the_checkpoint(family):
    model, ids, stacked, _ = family
    reference = transformers_logits(model, ids)
    got = llama_cpp_logits(stacked, ids)
    # stock llama.cpp's own conversion and graph, F32: up to 5e-3 of the logit scale apart (OLMoE); the top
    # token agrees nearly everywhere
    assert np.abs(got - reference).max() / np.abs(reference).max() < 1e-2
    assert (got.argmax(-1) == reference.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("settings", [{"n_batch": 512}, {"n_batch": 1, "mu": 0.9, "protect_ratio": 0.1}], ids=str)
def test_expert_groups_give_the_stacked_files_logits(family, settings, tmp_path):
    """The grouped CPU op (0010) in process, the group-by-group graph (0007) in a child process; prefill of the
    whole prompt, and decode token by token with ODP (prefill with ODP and protection in groups is Mixtral's,
    tests/quantize/test_quantize.py)."""
    from mc_gguf.loader.model import load

    _, ids, stacked, grouped = family
    expected = llama_cpp_logits(stacked, ids, **settings)
    np.testing.assert_array_equal(llama_cpp_logits(grouped, ids, **settings), expected)
    out = tmp_path / "split.npy"
    subprocess.run([sys.executable, str(HELPERS), str(grouped), json.dumps(ids), str(out), json.dumps(settings)],
                   env={**os.environ, "LLAMA_MC_EXPERT_GROUPS_SPLIT": "1"}, check=True, capture_output=True)
    np.testing.assert_array_equal(np.load(out), expected)
    if "mu" in settings:
        counts = []
        for path in (stacked, grouped):
            llm = load(path, n_ctx=512, **settings)
            llm.eval(ids)
            counts.append(llm.expert_stats())
        assert counts[0] == counts[1] and 0 < sum(counts[0].skipped) < sum(counts[0].computed)
