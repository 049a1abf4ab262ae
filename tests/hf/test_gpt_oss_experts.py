"""gpt-oss's experts as mc-gguf reads them: one expert's projection from the layer's stacked tensor (gate and up
interleaved, biases), whether the checkpoint holds them in full precision or, as the Hub's do, in MXFP4 blocks.

The reference is transformers' own model loaded from the same folder (MXFP4 dequantized by transformers'
integration), whose GptOssExperts hold [E, in, out] tensors with gate and up interleaved.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mc_gguf.errors import CheckpointError
from mc_gguf.hf.checkpoint import open_checkpoint
from mc_gguf.hf.tiny import build_tiny_family


def to_mxfp4(folder, seed: int = 1) -> None:
    """Replace the checkpoint's expert weights by random MXFP4 blocks and scales, as the Hub's gpt-oss stores
    them (``{name}_blocks`` [E, out, in / 32, 16], ``{name}_scales`` [E, out, in / 32]), and say so in config.json."""
    tensors = load_file(str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        n_expert, n_in, n_out = tensors.pop(name).shape
        tensors[f"{name}_blocks"] = torch.randint(0, 256, (n_expert, n_out, n_in // 32, 16), dtype=torch.uint8,
                                                  generator=g)
        tensors[f"{name}_scales"] = torch.randint(118, 124, (n_expert, n_out, n_in // 32), dtype=torch.uint8,
                                                  generator=g)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("storage", ["full-precision", "mxfp4"])
def test_each_experts_projections_and_biases_are_transformers_own(tmp_path, storage):
    from transformers import AutoModelForCausalLM

    folder = build_tiny_family("gptoss", tmp_path / "model")
    options = {}
    if storage == "mxfp4":
        from transformers import Mxfp4Config

        to_mxfp4(folder)
        options["quantization_config"] = Mxfp4Config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **options)
    ckpt = open_checkpoint(folder)
    hidden, ff = model.config.hidden_size, model.config.intermediate_size
    assert ckpt.expert_dims == (hidden, ff)
    assert ckpt.expert_shape(0, "gate") == (ff, hidden) and ckpt.expert_shape(0, "down") == (hidden, ff)
    for bid, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        for xid in range(ckpt.n_experts):
            expected = {"gate": experts.gate_up_proj[xid][:, 0::2].T, "up": experts.gate_up_proj[xid][:, 1::2].T,
                        "down": experts.down_proj[xid].T}
            biases = {"gate": experts.gate_up_proj_bias[xid][0::2], "up": experts.gate_up_proj_bias[xid][1::2],
                      "down": experts.down_proj_bias[xid]}
            for projection, weights in expected.items():
                got = torch.from_numpy(ckpt.expert_weight(bid, xid, projection))
                assert torch.equal(got, weights.float()), (bid, xid, projection)
                assert torch.equal(ckpt.expert_bias(bid, xid, projection), biases[projection].float())


def test_activation_constants_and_other_quantizations_are_refused(tmp_path):
    """llama.cpp's graph computes gpt-oss's activation with alpha 1.702 and limit 7; weights quantized by any
    other method than gpt-oss's MXFP4 experts cannot be read."""
    folder = build_tiny_family("gptoss", tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    for change, message in [({"swiglu_limit": 10.0}, "swiglu_limit = 10.0"),
                            ({"quantization_config": {"quant_method": "gptq"}}, "quantized (gptq)")]:
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
            open_checkpoint(folder)
