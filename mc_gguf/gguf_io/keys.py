"""Every ``mc.*`` GGUF metadata key mc-gguf writes or reads, with its type and meaning: the one place.

Stock llama.cpp ignores these keys; the patched runtime reads the ones marked
``runtime`` (llama-model.cpp's load_hparams, patches 0006, 0007 and 0020). docs/FORMAT.md
explains the layout they describe; ``mc-gguf inspect`` prints each key with
the meaning given here, and a test checks that FORMAT.md lists every key.

This module imports nothing heavy: the CLI reads it to print help and inspect files.
"""

from __future__ import annotations

from dataclasses import dataclass

# Provenance, and what reads the file
VERSION = "mc.version"
RUNTIME_PATCH_LEVEL = "mc.runtime.patch_level"

# Per-expert quantization types (layout per-expert)
EXPERT_GROUPS = "mc.experts.groups"

# The plan and its provenance
PLAN_LAYOUT = "mc.plan.layout"
PLAN_TYPES = "mc.plan.types"
PLAN_BUDGET = "mc.plan.budget_bpw"
PLAN_SCOPE = "mc.plan.scope"
PLAN_EXPERT_BPW = "mc.plan.expert_bpw"
PLAN_MODEL_BPW = "mc.plan.model_bpw"
QUANTIZE_GPTQ = "mc.quantize.gptq"
QUANTIZE_TUNE_ITERS = "mc.quantize.tune_iters"
CALIBRATION_MODEL = "mc.calibration.model"
CALIBRATION_TEXT = "mc.calibration.text"
CALIBRATION_TEXT_SHA256 = "mc.calibration.text_sha256"
CALIBRATION_TOKENS = "mc.calibration.tokens"

# Online Dynamic Pruning
ODP_MU = "mc.odp.mu"
ODP_MU_ALL = "mc.odp.mu_all"
ODP_MU_EXPS = "mc.odp.mu_exps"
ODP_RENORMALIZE = "mc.odp.renormalize"
ODP_PROTECT_RATIO = "mc.odp.protect_ratio"
ODP_ENABLED = "mc.odp.enabled"


@dataclass(frozen=True)
class MetadataKey:
    name: str
    gguf_type: str     # as docs/FORMAT.md writes it
    meaning: str       # one line
    read_by: str       # "runtime": the patched llama.cpp reads it; "info": written for people and tools
    bulky: bool = False  # one value per expert projection: inspect shows it as the expert table, not as a list


KEYS: tuple[MetadataKey, ...] = (
    MetadataKey(VERSION, "string", "the mc-gguf version that wrote the file", "info"),
    MetadataKey(RUNTIME_PATCH_LEVEL, "uint32", "the lowest patch level of mc-gguf's runtime that reads all of the "
                "file (0: any llama.cpp loads it as it is); mc-gguf refuses an older runtime with it", "info"),
    MetadataKey(EXPERT_GROUPS, "int32[n_layer * 3 * n_expert]",
                "the group (tensor blk.N.ffn_{proj}_exps.g<G>) of expert e of projection p in layer l, "
                "at index (l*3 + p)*n_expert + e; 0 in a dense layer (no experts)", "runtime", bulky=True),
    MetadataKey(PLAN_LAYOUT, "string", "per-expert or stock", "info"),
    MetadataKey(PLAN_TYPES, "string[n_layer * 3 * n_expert]",
                "the GGUF type of every expert projection, indexed as mc.experts.groups; empty in a dense layer",
                "info", bulky=True),
    MetadataKey(PLAN_BUDGET, "float32", "the bits-per-weight budget the plan was solved for", "info"),
    MetadataKey(PLAN_SCOPE, "string", "what the budget averages over: experts or model", "info"),
    MetadataKey(PLAN_EXPERT_BPW, "float32", "measured bits per weight of the expert tensors, scales included",
                "info"),
    MetadataKey(PLAN_MODEL_BPW, "float32", "measured bits per weight over every tensor of the file", "info"),
    MetadataKey(QUANTIZE_GPTQ, "bool", "whether GPTQ error compensation was used", "info"),
    MetadataKey(QUANTIZE_TUNE_ITERS, "uint32", "the most coordinate-descent sweeps that tuned the K-quant experts' "
                "integers after GPTQ (0: not tuned)", "info"),
    MetadataKey(CALIBRATION_MODEL, "string", "the calibrated model's name", "info"),
    MetadataKey(CALIBRATION_TEXT, "string", "the calibration text (a path, or the built-in default)", "info"),
    MetadataKey(CALIBRATION_TEXT_SHA256, "string", "SHA-256 of the calibration text", "info"),
    MetadataKey(CALIBRATION_TOKENS, "uint32", "calibration tokens", "info"),
    MetadataKey(ODP_MU, "float32[block_count]",
                "pruning threshold per layer: slot i >= 1 is skipped when its weight is below mu times the "
                "token's top weight; 0 turns the layer's pruning off", "runtime"),
    MetadataKey(ODP_MU_EXPS, "float32[block_count * expert_count]",
                "pruning thresholds per layer and expert, row-major: in a layer whose mc.odp.mu is > 0, slot i >= 1 "
                "is skipped when its weight is below the threshold of its expert times the token's top weight",
                "runtime"),
    MetadataKey(ODP_RENORMALIZE, "bool",
                "whether the weights a token keeps are renormalised after pruning, where the router renormalises "
                "(the paper's rule, and the default when the key is absent); false leaves them as they are",
                "runtime"),
    MetadataKey(ODP_PROTECT_RATIO, "float32",
                "share of a prompt's tokens (the most important) that keep all their experts; default 0.02",
                "runtime"),
    MetadataKey(ODP_MU_ALL, "float32", "one threshold for every layer (a load-time override)", "runtime"),
    MetadataKey(ODP_ENABLED, "bool", "false turns pruning off (a load-time override)", "runtime"),
)

BY_NAME: dict[str, MetadataKey] = {key.name: key for key in KEYS}


def meaning(name: str) -> str:
    """The key's one-line meaning, or a note that this mc-gguf does not know it."""
    key = BY_NAME.get(name)
    return key.meaning if key is not None else "not a key this mc-gguf knows (written by another version?)"
