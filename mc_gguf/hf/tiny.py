"""Tiny seeded checkpoints, built locally: the demo's model and the tests' fixtures.

The Mixtral has Mixtral's exact Hugging Face layout (sharded safetensors with
an index, per-expert ``w1/w2/w3`` tensors) and Mixtral's own 32,000-piece
SentencePiece tokenizer, which the PyPI package mistral-common ships
(Apache-2.0), so that nothing is downloaded from a hub. The other families
(``build_tiny_family``) are saved by transformers from their own config
classes; their BPE tokenizers cannot be had offline, so they carry the same
SentencePiece tokenizer.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from mc_gguf.errors import McGgufError

# Mistral-style instruction template (the role of Mixtral-Instruct's own): a
# user turn is "[INST] ... [/INST]", an assistant turn ends with </s>.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ '[INST] ' + message['content'] + ' [/INST] Understood.' + eos_token }}"
    "{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class TinyMixtralSpec:
    """Sizes of the tiny model. hidden_size is a multiple of 256 so K-quants apply."""

    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    num_local_experts: int = 4
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 1024
    rope_theta: float = 1e6
    seed: int = 0
    init_std: float = 0.02
    max_shard_size: str = "3MB"
    dtype: str = "float32"   # of the saved weights: bfloat16 halves a large synthetic model on disk


def mixtral_sentencepiece_model() -> Path:
    """Path of Mixtral's tokenizer.model as shipped inside mistral-common."""
    try:
        import mistral_common
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise McGgufError("mistral-common is needed for the tiny model's tokenizer: pip install mistral-common") from exc
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.exists():
        raise McGgufError(f"mistral-common does not ship {path.name} any more ({path})")
    return path


def save_mixtral_tokenizer(out_dir: Path) -> None:
    """Write tokenizer.model, tokenizer.json and tokenizer_config.json as Mixtral ships them."""
    from transformers import LlamaTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(mixtral_sentencepiece_model(), out_dir / "tokenizer.model")
    # transformers converts the SentencePiece model into a tokenizer.json.
    # Passing add_bos_token here puts Mixtral's "<s> $A" post-processor into tokenizer.json.
    tokenizer = LlamaTokenizer.from_pretrained(str(out_dir), add_bos_token=True, add_eos_token=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))


def build_tiny_mixtral(out_dir: str | Path, spec: TinyMixtralSpec = TinyMixtralSpec()) -> Path:
    """Save a seeded random MixtralForCausalLM with its tokenizer into ``out_dir``."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    out_dir = Path(out_dir)
    config = MixtralConfig(
        vocab_size=32000,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        num_local_experts=spec.num_local_experts,
        num_experts_per_tok=spec.num_experts_per_tok,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        sliding_window=None,
        tie_word_embeddings=False,
        initializer_range=spec.init_std,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(spec.seed)
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        # The default init leaves RMSNorm weights at exactly 1; perturb them so a
        # converter that dropped or misplaced a norm would be caught.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    model.to(getattr(torch, spec.dtype)).save_pretrained(str(out_dir), max_shard_size=spec.max_shard_size)
    save_mixtral_tokenizer(out_dir)
    return out_dir


# transformers' config class, model class and MoE settings of each family's tiny checkpoint.
TINY_FAMILIES = {
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, head_dim=64)),
    "qwen2moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        moe_intermediate_size=128, shared_expert_intermediate_size=256, num_experts=8, num_experts_per_tok=2)),
    # llama.cpp's OLMoE normalises K over all heads: as the real model, as many KV heads as heads
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                                                      num_key_value_heads=4)),
    # a dense first layer, a shared expert, routed weights scaled by 2.5; MLA attention with a q LoRA (llama.cpp
    # takes a model without one for DeepSeek-V2-Lite by its layer count)
    "deepseek2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        num_hidden_layers=3, first_k_dense_replace=1, moe_intermediate_size=128, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=False,
        topk_method="greedy", num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16,
        qk_nope_head_dim=32, v_head_dim=32)),
    # sigmoid routing with a selection bias (set at random below: a zero bias would not show its use), experts in
    # 2 groups of which the best one is eligible, weights renormalised and scaled, a dense first layer, a shared
    # expert; Q/K norms, attention biases, half-rotary heads (GLM-4.5's attention)
    "glm4moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        num_hidden_layers=3, first_k_dense_replace=1, moe_intermediate_size=128, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True, n_group=2,
        topk_group=1, num_nextn_predict_layers=0, head_dim=64, use_qk_norm=True, attention_bias=True,
        partial_rotary_factor=0.5)),
    # a router bias, expert biases, gate and up interleaved in one stacked tensor, the OAI SwiGLU; expert rows of
    # 160 (not whole blocks of 256, as gpt-oss's 2880); attention sinks and a sliding window of 8 tokens on every
    # other layer; YaRN rope as the real models have it
    "gptoss": ("GptOssConfig", "GptOssForCausalLM", dict(
        intermediate_size=160, num_local_experts=8, num_experts_per_tok=2, head_dim=64, sliding_window=8,
        max_position_embeddings=131072)),
}


def build_tiny_family(kind: str, out_dir: str | Path, seed: int = 7, **overrides) -> Path:
    """Save a seeded random checkpoint of family ``kind`` (TINY_FAMILIES) with Mixtral's tokenizer."""
    import torch
    import transformers

    out_dir = Path(out_dir)
    config_name, model_name, extra = TINY_FAMILIES[kind]
    config = getattr(transformers, config_name)(**{
        **dict(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2), **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
            if name.endswith("shared_expert_gate.weight"):
                param.normal_(0.0, 0.5)
            if name.endswith(("router.bias", "_proj_bias", "self_attn.sinks")):
                param.normal_(0.0, 0.5 if name.endswith("router.bias") else 0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.1)
    model.save_pretrained(str(out_dir))
    save_mixtral_tokenizer(out_dir)
    return out_dir
