"""Tensors read from a shard's bytes equal safetensors' own reading, dtype and all."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mc_gguf.hf.checkpoint import Checkpoint
from mc_gguf.hf.safetensors_io import read_safetensors_header


def test_tensors_read_from_the_shard_equal_safetensors_reading(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(3, 7, generator=g).to(torch.bfloat16),
        "f16": torch.randn(5, generator=g).to(torch.float16),
        "f32": torch.randn(2, 3, 4, generator=g),
        "i64": torch.arange(-4, 6),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 4),
        "f8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),  # through safetensors' own reader
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    ckpt = Checkpoint(tmp_path, {}, None, read_safetensors_header(path))
    with safe_open(str(path), framework="pt") as handle:
        for name in tensors:
            got, expected = ckpt.load_torch(name), handle.get_tensor(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape, name
            assert torch.equal(got.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), name
        for name in ("f32", "bf16", "f8"):  # one row of the first dimension (an expert of a stacked tensor)
            got, expected = ckpt.load_torch(name, 1), handle.get_tensor(name)[1]
            assert got.dtype == expected.dtype and got.shape == expected.shape, name
            assert torch.equal(got.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), name


def test_a_model_with_dense_layers_is_refused_naming_them(tmp_path):
    """Qwen3-MoE's mlp_only_layers, Qwen2-MoE's decoder_sparse_step, DeepSeek's first_k_dense_replace."""
    import json

    import pytest

    from mc_gguf.errors import CheckpointError
    from mc_gguf.hf.architectures import DEEPSEEK_V2, QWEN2_MOE
    from mc_gguf.hf.checkpoint import open_checkpoint

    config = {"architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 4, "hidden_size": 64,
              "num_attention_heads": 4, "vocab_size": 100, "num_experts": 4, "num_experts_per_tok": 2,
              "mlp_only_layers": [0]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="layers 0 have a dense FFN"):
        open_checkpoint(tmp_path)
    assert QWEN2_MOE.dense_layers.of({"num_hidden_layers": 4, "decoder_sparse_step": 2}) == [0, 2]
    assert DEEPSEEK_V2.dense_layers.of({"num_hidden_layers": 4, "first_k_dense_replace": 1}) == [0]
    assert QWEN2_MOE.dense_layers.of({"num_hidden_layers": 4, "decoder_sparse_step": 1, "mlp_only_layers": []}) == []


def test_deepseek_may_have_leading_dense_layers_only_and_no_routing_within_groups(tmp_path):
    """DeepSeek-V2's first_k_dense_replace layers are dense (llama.cpp's leading_dense_block_count); a dense layer
    after an MoE layer, a model without MoE layers, or group-limited routing (which llama.cpp's graph does not
    do) are refused before any work."""
    import json

    import pytest

    from mc_gguf.errors import CheckpointError
    from mc_gguf.hf.checkpoint import open_checkpoint

    base = {"architectures": ["DeepseekV2ForCausalLM"], "num_hidden_layers": 4, "hidden_size": 64,
            "num_attention_heads": 4, "vocab_size": 100, "n_routed_experts": 4, "num_experts_per_tok": 2,
            "first_k_dense_replace": 1, "routed_scaling_factor": 2.0}
    folder = tmp_path / "model"
    folder.mkdir()

    def open_with(**changes):
        (folder / "config.json").write_text(json.dumps({**base, **changes}))
        return open_checkpoint(folder)

    with pytest.raises(CheckpointError, match="no safetensors|model.safetensors"):
        open_with()  # the config passes; the weights are what is missing
    with pytest.raises(CheckpointError, match="layers 0, 2 have a dense FFN"):
        open_with(moe_layer_freq=2, first_k_dense_replace=0)
    with pytest.raises(CheckpointError, match="there are no experts"):
        open_with(first_k_dense_replace=4)
    with pytest.raises(CheckpointError, match="topk_method 'group_limited_greedy'"):
        open_with(topk_method="group_limited_greedy")
