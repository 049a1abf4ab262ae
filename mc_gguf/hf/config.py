"""config.json checked before any work: the values every stage computes with, in the ranges and JSON types they
are computed in, and the family's rules (its architecture row) that llama.cpp's graph can follow."""

from __future__ import annotations

import math
import re
from pathlib import Path

from mc_gguf.errors import CheckpointError
from mc_gguf.hf.architectures import SWIGLU_OAI_PARAMS, Converter, ExpertActivation, ExpertStorage, MoEArchitecture

# config.json keys every stage reads, besides the architecture row's own
REQUIRED_CONFIG = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")
# llama.cpp's limits (llama-hparams.h: LLAMA_MAX_LAYERS, LLAMA_MAX_EXPERTS)
MAX_LAYERS = 512
MAX_EXPERTS = 1024

# config.json values that must be positive where they are given (sizes, counts, epsilons, rope's base), and those
# that must not be negative; every number must be finite
POSITIVE_CONFIG = re.compile(r"(_size|_eps|_epsilon|^rope_theta|^head_dim|^max_position_embeddings|^num_.*_heads"
                             r"|^num_experts_per_tok|^n_routed_experts|^num_local_experts|^num_experts)$")
NON_NEGATIVE_CONFIG = re.compile(r"^(n_shared_experts|first_k_dense_replace|num_nextn_predict_layers|n_group"
                                 r"|topk_group|sliding_window|routed_scaling_factor)$")
# config.json values read as whole numbers where given (GGUF stores them as uint32; DenseLayers counts with them)
WHOLE_CONFIG = ("max_position_embeddings", "intermediate_size", "moe_intermediate_size", "num_key_value_heads",
                "head_dim", "sliding_window", "decoder_sparse_step", "moe_layer_freq", "first_k_dense_replace",
                "n_shared_experts", "num_nextn_predict_layers", "n_group", "topk_group")
UINT32_MAX = 2 ** 32 - 1
# values that are JSON objects where given, and lists of layer indices
OBJECT_CONFIG = ("rope_parameters", "rope_scaling", "quantization_config")
NUMBERS_WITHIN = ("rope_parameters", "rope_scaling")  # objects whose numbers the converters copy as well
LAYER_LIST_CONFIG = ("mlp_only_layers",)
# what mc-gguf's own converter (the rows whose converter is "mc-gguf": Mixtral) writes into the GGUF besides
# REQUIRED_CONFIG (gguf_io/metadata.py: add_hparams)
OWN_CONVERTER_CONFIG = ("max_position_embeddings", "intermediate_size", "rms_norm_eps")


def check_config(path: Path, config: dict, arch: MoEArchitecture) -> None:
    """The config.json of the model folder ``path`` against its architecture row, or a CheckpointError naming the
    key to fix."""
    n_expert_key = arch.n_expert_key(config)
    for key in (*REQUIRED_CONFIG, n_expert_key, arch.n_expert_used_key):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            found = "it is missing" if value is None else f"it is {value!r}"
            raise CheckpointError(f"{path / 'config.json'}: {key} must be a positive whole number; {found}")
    for key, most in (("num_hidden_layers", MAX_LAYERS), (n_expert_key, MAX_EXPERTS)):
        if config[key] > most:
            raise CheckpointError(f"{path / 'config.json'}: {key} = {config[key]}; llama.cpp loads at most {most}")
    _check_numbers(path, config)
    _check_kinds(path, config, arch)
    dense, leading_key = arch.dense_layers.of(config), arch.dense_layers.leading
    leading = int(config.get(leading_key) or 0) if leading_key else 0
    if dense != list(range(min(leading, int(config.get("num_hidden_layers") or 0)))):
        where = f"only the first {leading_key} layers" if leading_key else "no layer"
        raise CheckpointError(f"{path / 'config.json'}: layers {', '.join(map(str, dense))} have a dense FFN, "
                              f"not experts; in {arch.hf_architecture} {where} may (as in llama.cpp's graph)")
    if len(dense) >= int(config.get("num_hidden_layers") or 0) > 0:
        raise CheckpointError(f"{path / 'config.json'}: every layer has a dense FFN: there are no experts to compress")
    method = config.get("topk_method")
    if method not in (None, "greedy"):
        raise CheckpointError(f"{path / 'config.json'}: topk_method {method!r} (routing within groups of experts) is "
                              "not supported: llama.cpp's graph for this family routes without groups")
    groups = arch.expert_group_keys
    if groups:
        n_group, used = (config.get(key) or 1 for key in groups)
        if not (isinstance(n_group, int) and isinstance(used, int) and 1 <= used <= n_group
                and config[n_expert_key] % n_group == 0):
            raise CheckpointError(f"{path / 'config.json'}: {groups[0]} = {n_group!r} must divide the "
                                  f"{config[n_expert_key]} experts and {groups[1]} = {used!r} be in [1, {groups[0]}]")
    if arch.expert_activation is ExpertActivation.SWIGLU_OAI:
        for key, value in SWIGLU_OAI_PARAMS.items():
            if config.get(key, value) != value:
                raise CheckpointError(f"{path / 'config.json'}: {key} = {config[key]!r}; llama.cpp's graph "
                                      f"(LLM_FFN_SWIGLU_OAI_MOE) computes with {value}")
    quantization = (config.get("quantization_config") or {}).get("quant_method")
    if quantization and not (quantization == "mxfp4" and arch.expert_storage is ExpertStorage.STACKED):
        raise CheckpointError(f"{path / 'config.json'}: the weights are quantized ({quantization}); mc-gguf reads "
                              "full-precision checkpoints (and gpt-oss's MXFP4 experts). Save a dequantized copy "
                              "first (transformers: from_pretrained(..., dequantize=True), then save_pretrained)")
    if config[arch.n_expert_used_key] > config[n_expert_key]:
        raise CheckpointError(f"{path / 'config.json'}: {arch.n_expert_used_key} = {config[arch.n_expert_used_key]} "
                              f"is more than the {config[n_expert_key]} experts ({n_expert_key})")


def _check_numbers(path: Path, config: dict, where: str = "") -> None:
    """Finite numbers, positive sizes and epsilons: what the converters copy into the GGUF as they find it
    (an rms_norm_eps of NaN makes llama.cpp abort at the first token), in NUMBERS_WITHIN too;
    a size, count or epsilon that is not a number (or null) at all is refused as well."""
    for key, value in config.items():
        ranged = POSITIVE_CONFIG.search(key) or NON_NEGATIVE_CONFIG.search(key)
        if isinstance(value, dict) and not ranged:
            if key in NUMBERS_WITHIN and not where:  # one level down
                _check_numbers(path, value, f"{key}.")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if ranged and value is not None:
                raise CheckpointError(f"{path / 'config.json'}: {where}{key} is {value!r}; it must be a number")
            continue
        if not math.isfinite(value):
            raise CheckpointError(f"{path / 'config.json'}: {where}{key} is {value}; it must be a finite number")
        if POSITIVE_CONFIG.search(key) and value <= 0 or NON_NEGATIVE_CONFIG.search(key) and value < 0:
            raise CheckpointError(f"{path / 'config.json'}: {where}{key} is {value}; it must be "
                                  f"{'positive' if POSITIVE_CONFIG.search(key) else 'at least 0'}")


def _check_kinds(path: Path, config: dict, arch: MoEArchitecture) -> None:
    """The JSON type of every value a stage reads: whole numbers GGUF's uint32 holds, objects, lists of layers
    (the row's dense-layer keys among them); and what mc-gguf's own converter writes, given."""
    where, dense = path / "config.json", arch.dense_layers
    required = OWN_CONVERTER_CONFIG if arch.converter is Converter.MC_GGUF else ()
    for key in required:
        if config.get(key) is None:
            raise CheckpointError(f"{where}: {key} is missing; {arch.hf_architecture}'s GGUF holds it")
    for key in (*WHOLE_CONFIG, *(key for key in (dense.leading, dense.step) if key)):
        value = config.get(key)
        if value is not None and not (_whole(value) and value <= UINT32_MAX):
            raise CheckpointError(f"{where}: {key} is {value!r}; it must be a whole number below 2^32")
    for key in OBJECT_CONFIG:
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise CheckpointError(f"{where}: {key} is {config[key]!r}; it must be a JSON object")
    for key in (*LAYER_LIST_CONFIG, *((dense.listed,) if dense.listed else ())):
        value = config.get(key)
        if value is not None and not (isinstance(value, list) and all(_whole(v) for v in value)):
            raise CheckpointError(f"{where}: {key} is {value!r}; it must be a list of layer indices")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
