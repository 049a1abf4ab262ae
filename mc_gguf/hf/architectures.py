"""Mixture-of-Experts architectures, described as data.

Every stage (convert, calibrate, quantize) reads one row of this table to find
a layer's router and experts; a new architecture is a new row. Hugging Face
tensor names are templates with ``{bid}`` (block index) and ``{xid}`` (expert
index); GGUF names come from gguf-py's TensorNameMap.

What mc-gguf does not decide itself (metadata, vocabulary, every tensor but
the routed experts) comes from a converter named by the row: mc-gguf's own
(gguf_io/convert.py, Mixtral) or llama.cpp's convert_hf_to_gguf.py from the
pinned sdist (gguf_io/llama_convert.py), which knows each family's keys,
renames and tokenizers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

import gguf

from mc_gguf.errors import UnsupportedArchitectureError


class SharedExpert(Enum):
    """How a family's shared expert adds its output to the routed experts'. ``block`` holds transformers' own
    submodules of the row's ``shared_modules`` (calibrate/forward.py puts them there)."""

    SIGMOID_GATED = "sigmoid-gated"  # Qwen2MoeSparseMoeBlock; llama.cpp's qwen2moe.cpp: ffn_gate_inp_shexp, sigmoid
    SUMMED = "summed"                # DeepseekV2Moe; llama.cpp's deepseek2.cpp: ffn_{gate,up,down}_shexp, as it is

    def output(self, block: Any, x: Any) -> Any:
        """The shared expert's part of the MoE block's output for the inputs ``x`` (torch tensors)."""
        if self is SharedExpert.SIGMOID_GATED:
            return block.shared_expert_gate(x).sigmoid() * block.shared_expert(x)
        return block.shared_experts(x)


# gpt-oss's gated activation as llama.cpp's build_moe_ffn computes it (LLM_FFN_SWIGLU_OAI_MOE: alpha, limit)
SWIGLU_OAI_PARAMS = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}


class ExpertActivation(Enum):
    """An expert's gated activation of (x gate^T + b_gate, x up^T + b_up): the down projection's input."""

    ACT = "act"               # config.json's hidden_act of gate, times up (SwiGLU where it is silu, as llama.cpp)
    SWIGLU_OAI = "swiglu-oai"  # GptOssExperts._apply_gate; llama.cpp's ggml_swiglu_oai

    def glu(self, config: dict) -> Callable[[Any, Any], Any]:
        """glu(gate, up) on torch tensors, with the parameters of ``config`` (config.json)."""
        if self is ExpertActivation.ACT:
            from transformers.activations import ACT2FN

            act = ACT2FN[config.get("hidden_act", "silu")]
            return lambda gate, up: act(gate) * up
        alpha, limit = (float(config.get(key, default)) for key, default in SWIGLU_OAI_PARAMS.items())

        def swiglu_oai(gate, up):  # gate clamped above at the limit, up at +-limit
            gate = gate.clamp(max=limit)
            return (up.clamp(-limit, limit) + 1) * gate * (alpha * gate).sigmoid()

        return swiglu_oai


class ExpertStorage(Enum):
    """How a checkpoint stores a layer's routed experts."""

    PER_EXPERT = "per-expert"  # one [out, in] tensor per expert and projection: ``expert`` + ``.{projection}.weight``
    # one [E, in, out] tensor per layer, ``expert`` + ``.{projection}`` (gpt-oss's GptOssExperts; gate and up sharing
    # one tensor are interleaved, gate in the even output columns and up in the odd ones, as _apply_gate reads them)
    STACKED = "stacked"


class Converter(Enum):
    """Who writes the metadata and non-expert tensors (see the module docstring; gguf_io/convert.py's tables
    hold one entry for each)."""

    MC_GGUF = "mc-gguf"
    LLAMA_CPP = "llama.cpp"


@dataclass(frozen=True)
class ExpertSource:
    """Where one expert's projection is in the checkpoint: its own tensor [out, in] (``index`` None), or row
    ``index`` of a layer's stacked tensor [E, in, out] whose output columns start, step, start + 2 step, ...
    (``columns``) are the projection's."""
    tensor: str
    index: int | None = None
    columns: tuple[int, int] = (0, 1)
    bias: str | None = None  # the stacked tensor of the projection's biases [E, out] (same index and columns)


@dataclass(frozen=True)
class DenseLayers:
    """The config.json keys by which a family's layers have a dense FFN instead of routed experts (None: the
    family has no such key): the first ``leading`` layers (DeepSeek's first_k_dense_replace;
    llama.cpp's leading_dense_block_count), the layers ``listed`` (Qwen2/3-MoE's mlp_only_layers), and every
    layer but each ``step``-th (Qwen2/3-MoE's decoder_sparse_step, as Qwen2MoeDecoderLayer reads it:
    experts where (bid + 1) % step == 0; DeepSeek's moe_layer_freq is read the same way)."""
    leading: str | None = None
    listed: str | None = None
    step: str | None = None

    def of(self, config: dict) -> list[int]:
        """The dense layers of a config.json, ascending."""
        def value(key: str | None):
            return config.get(key) if key else None

        n_layers = int(config.get("num_hidden_layers") or 0)
        dense = set(value(self.listed) or [])
        step = value(self.step) or 1
        dense |= {bid for bid in range(n_layers) if (bid + 1) % step}
        dense |= set(range(min(int(value(self.leading) or 0), n_layers)))
        return sorted(dense)


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
    # How a shared expert adds to the routed experts' output (None: no shared expert), and the MoE block's
    # transformers submodules that compute it (``shared_modules``), used as they are.
    shared_expert: SharedExpert | None
    # config.json keys: the expert count (the first present of these), experts per token.
    n_expert_keys: tuple[str, ...]
    n_expert_used_key: str
    gating: gguf.ExpertGatingFuncType
    # Are the top-k weights renormalised to sum to 1 (Mixtral: yes)? Read from config.json's
    # ``norm_topk_key`` where the family has one, this being transformers' default.
    norm_topk_prob: bool
    # HF stores Q/K for rotate-half rope; llama.cpp's "llama" arch rotates
    # adjacent pairs, so Q and K rows are permuted on conversion.
    permute_qk: bool
    # transformers' module names inside a decoder layer, for streaming calibration:
    # the MoE block, and the norm whose output is the MoE block's input.
    hf_moe_module: str = "mlp"
    # transformers' router inside the MoE block (which returns logits, weights and experts)
    hf_router: str = "gate"
    moe_input_norm: str = "post_attention_layernorm"
    embed_tokens: str = "model.embed_tokens.weight"
    norm_topk_key: str | None = None
    shared_modules: tuple[str, ...] = ()
    # config.json key of the factor the routed experts' weights are multiplied by (DeepSeek's
    # routed_scaling_factor; llama.cpp's expert_weights_scale), None: 1.
    routed_scale_key: str | None = None
    # Which layers have a dense FFN instead of experts (llama.cpp's graph allows only leading ones, and only where
    # the row names a ``leading`` key), by config.json's keys; none of them: every layer is an MoE layer.
    dense_layers: DenseLayers = DenseLayers()
    # The router's parameter added to the probabilities for choosing the slots only (DeepSeek-V3 and GLM4-MoE's
    # e_score_correction_bias; llama.cpp's exp_probs_b), None: no selection bias.
    selection_bias: str | None = None
    # config.json keys of the expert groups and of the groups a token may choose from (llama.cpp's
    # expert_group_count and expert_group_used_count), None: no groups.
    expert_group_keys: tuple[str, str] | None = None
    # How the checkpoint stores a layer's routed experts.
    expert_storage: ExpertStorage = ExpertStorage.PER_EXPERT
    # Do the experts' projections have biases (stacked: ``{tensor}_bias`` [E, out]; llama.cpp's ffn_*_exps.bias)?
    expert_biases: bool = False
    # The router's parameter added to its logits (gpt-oss's bias; llama.cpp's ffn_gate_inp.bias), None: none.
    router_bias: str | None = None
    # The experts' gated activation.
    expert_activation: ExpertActivation = ExpertActivation.ACT
    # Does transformers' MoE block return (output, router scores) instead of the output (GptOssMLP)?
    hf_moe_returns_scores: bool = False
    # Who writes the metadata and non-expert tensors.
    converter: Converter = Converter.MC_GGUF

    def __post_init__(self):
        for name, kind in (("shared_expert", SharedExpert), ("expert_storage", ExpertStorage),
                           ("expert_activation", ExpertActivation), ("converter", Converter)):
            value = getattr(self, name)
            if not (isinstance(value, kind) or value is None and name == "shared_expert"):
                raise TypeError(f"{self.hf_architecture}: {name} must be a {kind.__name__}, not {value!r}")

    def renormalizes(self, config: dict) -> bool:
        """Are a token's top-k routing weights renormalised (config.json's ``norm_topk_key``, else the row's)?"""
        key = self.norm_topk_key
        return bool(config.get(key, self.norm_topk_prob)) if key else self.norm_topk_prob

    def n_expert_key(self, config: dict) -> str:
        """The config.json key holding the expert count: the first of ``n_expert_keys`` present (the first if none)."""
        return next((key for key in self.n_expert_keys if key in config), self.n_expert_keys[0])

    def expert_source(self, bid: int, xid: int, projection: str) -> ExpertSource:
        """Where expert ``xid``'s ``projection`` (gate, up or down) of layer ``bid`` is, e.g. the tensor
        ``...experts.3.w1.weight``, or row 3 of ``...experts.gate_up_proj``, its even columns."""
        hf_proj = dict(self.expert_projections)[projection]
        if self.expert_storage is ExpertStorage.PER_EXPERT:
            return ExpertSource(f"{self.expert.format(bid=bid, xid=xid)}.{hf_proj}.weight")
        sharing = [p for p, h in self.expert_projections if h == hf_proj]
        tensor = f"{self.expert.format(bid=bid)}.{hf_proj}"
        return ExpertSource(tensor, xid, (sharing.index(projection), len(sharing)),
                            f"{tensor}_bias" if self.expert_biases else None)

    def stacked_expert_name(self, bid: int, projection: str) -> str:
        """The key TensorNameMap resolves to ``blk.N.ffn_{projection}_exps``."""
        return self.stacked_expert.format(bid=bid, proj=dict(self.expert_projections)[projection], gguf=projection)

    def expert_pattern(self) -> str:
        """A regular expression matching every routed expert's checkpoint weights (of any layer); a stacked
        layout's biases are not matched (llama.cpp's converter writes them)."""
        if self.expert_storage is ExpertStorage.STACKED:  # also MXFP4's blocks and scales (hf/mxfp4.py)
            template = re.escape(self.expert.format(bid="{bid}")).replace(r"\{bid\}", r"\d+")
            weights = "|".join(sorted({re.escape(h) for _, h in self.expert_projections}))
            return f"^{template}\\.({weights})(_blocks|_scales)?$"
        template = re.escape(self.expert.format(bid="{bid}", xid="{xid}"))
        return "^" + template.replace(r"\{bid\}", r"\d+").replace(r"\{xid\}", r"\d+") + r"\."

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
    n_expert_keys=("num_local_experts",),
    n_expert_used_key="num_experts_per_tok",
    gating=gguf.ExpertGatingFuncType.SOFTMAX,
    norm_topk_prob=True,
    permute_qk=True,
)

# Qwen3-MoE: softmax routing, renormalised when config.json says so (Qwen3-30B-A3B and 235B do), no
# shared expert. transformers 5 writes the expert count as num_local_experts, the Hub's files as num_experts.
QWEN3_MOE = MoEArchitecture(
    hf_architecture="Qwen3MoeForCausalLM",
    gguf_arch=gguf.MODEL_ARCH.QWEN3MOE,
    router="model.layers.{bid}.mlp.gate",
    expert="model.layers.{bid}.mlp.experts.{xid}",
    expert_projections=(("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")),
    stacked_expert="model.layers.{bid}.mlp.experts.{proj}",
    shared_expert=None,
    n_expert_keys=("num_experts", "num_local_experts"),
    n_expert_used_key="num_experts_per_tok",
    gating=gguf.ExpertGatingFuncType.SOFTMAX,
    norm_topk_prob=False,
    norm_topk_key="norm_topk_prob",
    permute_qk=False,
    dense_layers=DenseLayers(listed="mlp_only_layers", step="decoder_sparse_step"),
    converter=Converter.LLAMA_CPP,
)

# OLMoE: Qwen3-MoE's MoE block (softmax, top-k weights not renormalised by default), Q/K norms over all heads;
# experts in every layer.
OLMOE = replace(QWEN3_MOE, hf_architecture="OlmoeForCausalLM", gguf_arch=gguf.MODEL_ARCH.OLMOE,
                dense_layers=DenseLayers())

# Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen3-MoE's routing plus a shared expert whose output is scaled by
# a sigmoid gate of its own (Qwen2MoeSparseMoeBlock); the shared expert is never quantized per expert nor pruned.
QWEN2_MOE = replace(QWEN3_MOE, hf_architecture="Qwen2MoeForCausalLM", gguf_arch=gguf.MODEL_ARCH.QWEN2MOE,
                    shared_expert=SharedExpert.SIGMOID_GATED, shared_modules=("shared_expert", "shared_expert_gate"))

# DeepSeek-V2 (V2-Lite, V2, V2.5): softmax routing, top-k weights not renormalised (norm_topk_prob), times
# routed_scaling_factor; shared experts whose output is added as it is (DeepseekV2Moe); leading dense layers.
# Attention is MLA, which only llama.cpp's converter (kv_b split) and graph need to know.
DEEPSEEK_V2 = replace(QWEN3_MOE, hf_architecture="DeepseekV2ForCausalLM", gguf_arch=gguf.MODEL_ARCH.DEEPSEEK2,
                      n_expert_keys=("n_routed_experts",), shared_expert=SharedExpert.SUMMED, shared_modules=("shared_experts",),
                      routed_scale_key="routed_scaling_factor",
                      dense_layers=DenseLayers(leading="first_k_dense_replace", step="moe_layer_freq"))

# GLM4-MoE (GLM-4.5, GLM-4.5-Air, GLM-4.6): sigmoid routing with a selection bias, top-k weights renormalised
# (norm_topk_prob) and scaled by routed_scaling_factor, expert groups (n_group; 1 in the released models),
# DeepSeek-V2's shared experts and leading dense layers. transformers 5 writes the expert count as
# num_local_experts, the Hub's files as n_routed_experts.
GLM4_MOE = replace(DEEPSEEK_V2, hf_architecture="Glm4MoeForCausalLM", gguf_arch=gguf.MODEL_ARCH.GLM4_MOE,
                   n_expert_keys=("n_routed_experts", "num_local_experts"), gating=gguf.ExpertGatingFuncType.SIGMOID,
                   norm_topk_prob=True, selection_bias="e_score_correction_bias",
                   expert_group_keys=("n_group", "topk_group"),
                   dense_layers=DenseLayers(leading="first_k_dense_replace"))

# gpt-oss (20b, 120b): a router with a bias; the top-k chosen by the logits, weighted by a softmax over the
# chosen (llama.cpp's SOFTMAX_WEIGHT: the softmax over all experts renormalised over the top-k is the same);
# experts stacked per layer with biases, gate and up interleaved in one tensor; the OAI SwiGLU (clamped at
# swiglu_limit, sigmoid scaled by swiglu_alpha). Attention sinks and sliding windows are llama.cpp's converter's
# and graph's. The Hub's checkpoints hold the experts in MXFP4 blocks, which hf/mxfp4.py decodes.
GPT_OSS = replace(QWEN3_MOE, hf_architecture="GptOssForCausalLM", gguf_arch=gguf.MODEL_ARCH.GPT_OSS,
                  router="model.layers.{bid}.mlp.router", hf_router="router", expert="model.layers.{bid}.mlp.experts",
                  expert_projections=(("gate", "gate_up_proj"), ("up", "gate_up_proj"), ("down", "down_proj")),
                  stacked_expert="model.layers.{bid}.mlp.experts.{gguf}_proj", n_expert_keys=("num_local_experts",),
                  norm_topk_prob=True, norm_topk_key=None, expert_storage=ExpertStorage.STACKED,
                  expert_biases=True, router_bias="bias", expert_activation=ExpertActivation.SWIGLU_OAI,
                  hf_moe_returns_scores=True,
                  dense_layers=DenseLayers())

ARCHITECTURES: dict[str, MoEArchitecture] = {arch.hf_architecture: arch for arch in (MIXTRAL, QWEN2_MOE, QWEN3_MOE,
                                                                                     OLMOE, DEEPSEEK_V2, GLM4_MOE,
                                                                                     GPT_OSS)}


def architecture_for(config: dict) -> MoEArchitecture:
    """The table row for a config.json, or a clear error naming what is supported."""
    names = config.get("architectures") or []
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise UnsupportedArchitectureError(f"config.json's architectures is {names!r}; it must be a list of names "
                                           "(such as [\"MixtralForCausalLM\"])")
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    supported = ", ".join(sorted(ARCHITECTURES))
    if not names:
        raise UnsupportedArchitectureError(
            f"config.json names no architecture (no 'architectures' list; model_type is "
            f"{config.get('model_type')!r}); mc-gguf supports {supported}")
    raise UnsupportedArchitectureError(f"unsupported architecture {', '.join(names)}; mc-gguf supports {supported}")
