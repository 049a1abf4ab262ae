"""Mixture-of-Experts architectures, described as data.

Every stage (convert, calibrate, quantize) reads one row of this table to find
a layer's router and experts; a new architecture is a new row. Hugging Face
tensor names are templates with ``{bid}`` (block index) and ``{xid}`` (expert
index); GGUF names come from gguf-py's TensorNameMap.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from mc_gguf.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class MoEArchitecture:
    hf_architecture: str
    gguf_arch: gguf.MODEL_ARCH
    # Where the router and the routed experts live.
    router: str
    expert: str
    # Hugging Face projection name of each GGUF expert projection (gate, up, down).
    expert_projections: tuple[tuple[str, str], ...]
    # The name gguf-py's TensorNameMap knows for the stacked tensor of a projection.
    stacked_expert: str
    shared_expert: str | None
    # config.json keys.
    n_expert_key: str
    n_expert_used_key: str
    gating: gguf.ExpertGatingFuncType
    # Are the top-k weights renormalised to sum to 1 (Mixtral: yes)?
    norm_topk_prob: bool
    # HF stores Q/K for rotate-half rope; llama.cpp's "llama" arch rotates
    # adjacent pairs, so Q and K rows are permuted on conversion.
    permute_qk: bool
    # transformers' module names inside a decoder layer, for streaming calibration:
    # the MoE block, and the norm whose output is the MoE block's input.
    hf_moe_module: str = "mlp"
    moe_input_norm: str = "post_attention_layernorm"
    embed_tokens: str = "model.embed_tokens.weight"

    def expert_tensor(self, bid: int, xid: int, projection: str) -> str:
        """HF name of one expert's projection weight, e.g. ``...experts.3.w1.weight``."""
        hf_proj = dict(self.expert_projections)[projection]
        return f"{self.expert.format(bid=bid, xid=xid)}.{hf_proj}.weight"

    def stacked_expert_name(self, bid: int, projection: str) -> str:
        """The key TensorNameMap resolves to ``blk.N.ffn_{projection}_exps``."""
        return self.stacked_expert.format(bid=bid, proj=dict(self.expert_projections)[projection])

    def checkpoint_moe_module(self, bid: int) -> str:
        """The MoE block's name in the checkpoint, e.g. ``model.layers.3.block_sparse_moe``."""
        return self.router.format(bid=bid).rsplit(".", 1)[0]


MIXTRAL = MoEArchitecture(
    hf_architecture="MixtralForCausalLM",
    gguf_arch=gguf.MODEL_ARCH.LLAMA,
    router="model.layers.{bid}.block_sparse_moe.gate",
    expert="model.layers.{bid}.block_sparse_moe.experts.{xid}",
    expert_projections=(("gate", "w1"), ("up", "w3"), ("down", "w2")),
    stacked_expert="model.layers.{bid}.block_sparse_moe.experts.{proj}",
    shared_expert=None,
    n_expert_key="num_local_experts",
    n_expert_used_key="num_experts_per_tok",
    gating=gguf.ExpertGatingFuncType.SOFTMAX,
    norm_topk_prob=True,
    permute_qk=True,
)

ARCHITECTURES: dict[str, MoEArchitecture] = {arch.hf_architecture: arch for arch in (MIXTRAL,)}


def architecture_for(config: dict) -> MoEArchitecture:
    """The table row for a config.json, or a clear error naming what is supported."""
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    supported = ", ".join(sorted(ARCHITECTURES))
    if not names:
        raise UnsupportedArchitectureError(
            f"config.json names no architecture (no 'architectures' list; model_type is "
            f"{config.get('model_type')!r}); mc-gguf supports {supported}")
    raise UnsupportedArchitectureError(f"unsupported architecture {', '.join(names)}; mc-gguf supports {supported}")
