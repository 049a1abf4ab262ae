"""A converted GGUF run in llama.cpp gives transformers' next-token logits."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from helpers import PROMPT, llama_cpp_logits, transformers_logits

# Max |llama.cpp - transformers| over all positions and the whole vocabulary,
# relative to the largest |logit|. F32: both engines compute in float32 with
# different summation orders (~1e-6 seen); 1e-4 leaves room for other CPUs' SIMD.
# F16: every weight rounded to 11 significant bits (relative error <= 2^-12),
# which moves logits by ~1e-3 of their scale. Q8_0: 8-bit blocks of 32 with an
# F16 scale (relative error up to ~1/254 per weight) move them by ~2e-2.
TOLERANCE = {"f32": 1e-4, "f16": 5e-3, "bf16": 4e-2, "q8_0": 5e-2}


@pytest.fixture(scope="module")
def prompt_ids(hf_tokenizer):
    ids = hf_tokenizer(PROMPT).input_ids
    assert ids[0] == 1 and len(ids) > 40
    return ids


@pytest.fixture(scope="module")
def reference(hf_model, prompt_ids):
    return transformers_logits(hf_model, prompt_ids)


@pytest.mark.parametrize("out_type", ["f32", "f16", "bf16", "q8_0"])
def test_logits_match_transformers(converted, prompt_ids, reference, out_type):
    got = llama_cpp_logits(converted(out_type), prompt_ids)
    scale = np.abs(reference).max()
    rel_err = np.abs(got - reference).max() / scale
    assert rel_err < TOLERANCE[out_type], f"{out_type}: max relative logit error {rel_err:.2e}"

    # Top-1 must agree wherever the reference's top-2 margin is larger than
    # twice the allowed error; for F32 that is every position of this prompt.
    top2 = np.sort(reference, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > 2 * TOLERANCE[out_type] * scale
    agree = got.argmax(-1) == reference.argmax(-1)
    assert agree[decisive].all(), f"{out_type}: top-1 differs at positions {np.flatnonzero(decisive & ~agree)}"
    if out_type == "f32":
        assert agree.all()


def test_stacked_experts_and_router_layout(converted, tiny_model_dir):
    """The GGUF holds what stock llama.cpp loads for a Mixtral: stacked experts, an F32 router."""
    from safetensors import safe_open

    reader = gguf.GGUFReader(converted("f32"))
    tensors = {t.name: t for t in reader.tensors}
    gate = tensors["blk.1.ffn_gate_exps.weight"]
    assert gate.tensor_type == gguf.GGMLQuantizationType.F32
    assert list(gate.shape) == [256, 512, 4]  # ggml order: n_embd, n_ff, n_expert
    stacked = np.asarray(gate.data)  # numpy order: n_expert, n_ff, n_embd
    index = (tiny_model_dir / "model.safetensors.index.json").read_text()
    import json

    shard = json.loads(index)["weight_map"]["model.layers.1.block_sparse_moe.experts.2.w1.weight"]
    with safe_open(str(tiny_model_dir / shard), framework="pt") as f:
        expert = f.get_tensor("model.layers.1.block_sparse_moe.experts.2.w1.weight").float().numpy()
    np.testing.assert_array_equal(stacked[2], expert)
    router = tensors["blk.0.ffn_gate_inp.weight"]
    assert router.tensor_type == gguf.GGMLQuantizationType.F32
    q8 = {t.name: t for t in gguf.GGUFReader(converted("q8_0")).tensors}
    assert q8["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert q8["blk.0.ffn_up_exps.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert q8["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_metadata_describes_the_moe(converted):
    reader = gguf.GGUFReader(converted("f16"))

    def value(key):
        return reader.fields[key].contents()

    assert value("general.architecture") == "llama"
    assert value("llama.expert_count") == 4
    assert value("llama.expert_used_count") == 2
    assert value("llama.block_count") == 2
    assert value("tokenizer.ggml.model") == "llama"
    assert "[INST]" in value("tokenizer.chat_template")
    assert value("tokenizer.ggml.bos_token_id") == 1
