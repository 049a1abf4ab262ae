"""The per-expert layout and ODP in other MoE families' graphs (Qwen2-MoE with its shared expert, Qwen3-MoE, OLMoE).

Each family's tiny seeded checkpoint is built with transformers and converted
by llama.cpp's own convert_hf_to_gguf.py from the pinned sdist (with its own
gguf-py). The families' BPE tokenizers cannot be had offline, so these
checkpoints carry Mixtral's SentencePiece tokenizer and the converter reads it
with its SentencePiece reader; the tokenizer is not what is tested here. The
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

from mc_gguf.gguf_io.regroup import regroup_experts
from mc_gguf.hf.tiny import save_mixtral_tokenizer

from helpers import PROMPT, llama_cpp_logits, transformers_logits

HELPERS = Path(__file__).parent.parent / "helpers.py"

FAMILIES = {
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, head_dim=64)),
    "qwen2moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        moe_intermediate_size=128, shared_expert_intermediate_size=256, num_experts=8, num_experts_per_tok=2)),
    # llama.cpp's OLMoE normalises K over all heads: as the real model, as many KV heads as heads
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                                                      num_key_value_heads=4)),
}
PARTITION = {0: [1, 3, 5, 7], 1: [0, 2], 2: [4, 6]}
DOWN_PARTITION = {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}

# llama.cpp's converter, its SentencePiece reader for the vocabulary (see the module docstring)
CONVERTER = """
import sys
sys.path.insert(0, sys.argv[1])
import convert_hf_to_gguf
from conversion import get_model_class
cls = get_model_class(sys.argv[2])
cls.set_vocab = lambda self: self._set_vocab_sentencepiece()
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[3:]]
convert_hf_to_gguf.main()
"""


def build_family(kind: str, folder: Path) -> Path:
    import torch
    import transformers

    config_name, model_name, extra = FAMILIES[kind]
    config = getattr(transformers, config_name)(**{
        **dict(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2), **extra})
    torch.manual_seed(7)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
            if name.endswith("shared_expert_gate.weight"):
                param.normal_(0.0, 0.5)
    model.save_pretrained(str(folder))
    save_mixtral_tokenizer(folder)
    return folder


def llama_convert(model_dir: Path, out: Path, architecture: str) -> Path:
    from mc_gguf.runtime.source import BuildFlags, patched_source

    source = patched_source(BuildFlags(stock=True))
    env = {key: value for key, value in os.environ.items() if key != "NO_LOCAL_GGUF"}  # its own gguf-py
    result = subprocess.run([sys.executable, "-c", CONVERTER, str(source), architecture, str(model_dir),
                             "--outtype", "f32", "--outfile", str(out)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_family(request.param, tmp_path_factory.mktemp(request.param) / "model")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(str(folder))(PROMPT).input_ids
    stacked = llama_convert(folder, folder.parent / "f32.gguf", FAMILIES[request.param][1])
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


@pytest.mark.parametrize("settings", [{"n_batch": 512}, {"n_batch": 1},
                                      {"n_batch": 512, "mu": 0.9, "protect_ratio": 0.1},
                                      {"n_batch": 1, "mu": 0.9, "protect_ratio": 0.1}], ids=str)
def test_expert_groups_give_the_stacked_files_logits(family, settings, tmp_path):
    """The grouped CPU op (0010) in process, the group-by-group graph (0007) in a child process."""
    from mc_gguf.evaluate.run import load

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
