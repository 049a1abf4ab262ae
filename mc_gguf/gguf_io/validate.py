"""Check a GGUF before anything else reads it: its header as ggml's gguf.cpp reads it (header.py's ``scan``),
then the hyper-parameters llama.cpp's loader asserts on (aborting the process) rather than refusing with a reason.

``check_model`` adds what llama_model::load_hparams and llama_vocab::load
assert on (llama-model.cpp, llama-vocab.cpp of the pinned tree): block_count
in [1, LLAMA_MAX_LAYERS], nextn_predict_layers not above it, expert_count at
most LLAMA_MAX_EXPERTS with expert_used_count (a number, or one per layer),
expert_group_count and expert_group_used_count consistent with it,
rope.scaling.type one of LLAMA_ROPE_SCALING_TYPES, finite non-negative norm
epsilons (ggml's rms_norm asserts eps >= 0), tokens unique (an empty one
named "[EMPTY_<i>]" as llama_vocab::load names it), with as many scores and
types as tokens and special token ids among them; and refuses files that are
not models (LoRA adapters, multimodal projectors) with what they are. Past
the loader, it refuses what llama.cpp aborts on when it tokenizes or
computes: a file without a vocabulary (tokenizer.ggml.model none), byte
tokens in a WPM (bert) vocabulary, head counts, feed-forward lengths or
experts per token that differ between the layers of an architecture whose
graph takes the first layer's for all, 1-D tensors (norms, biases) not in F32, and
weights of a type ggml's CPU backend has no dot product for (F64, I32, ...).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from mc_gguf.errors import GGUFFileError
from mc_gguf.gguf_io.header import GGUFHeader, scan

LLAMA_MAX_LAYERS = 512               # llama-hparams.h
LLAMA_MAX_EXPERTS = 1024             # llama-hparams.h
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # llama-model.cpp: LLAMA_ROPE_SCALING_TYPES

F32 = 0  # ggml.h: GGML_TYPE_F32
# ggml types without a dot product on the CPU (type_traits_cpu in ggml-cpu.c has no vec_dot for them: Q8_1 and Q8_K
# only hold the activations other types multiply with): a weight of such a type makes llama.cpp crash
NO_DOT_PRODUCT = {9: "Q8_1", 15: "Q8_K", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64"}

# the token ids a tokenizer may name (llama-vocab.cpp reads them as indices into the tokens)
SPECIAL_TOKEN_KEYS = ("bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "mask", "fim_pre", "fim_suf",
                      "fim_mid", "fim_pad", "fim_rep", "fim_sep")


# tokenizer.ggml.model of a file without a vocabulary (llama_vocab::load: LLAMA_VOCAB_TYPE_NONE); llama.cpp loads it
# and aborts on the first text it tokenizes
NO_VOCAB = ("none", "no_vocab")
BYTE_TOKEN = 6  # llama.h: LLAMA_TOKEN_TYPE_BYTE
# the per-layer hyper-parameters that llama.cpp reads as one number or one per layer (get_key_or_arr)
PER_LAYER_KEYS = ("attention.head_count", "attention.head_count_kv", "feed_forward_length", "expert_used_count")


@functools.cache
def first_layer_architectures() -> frozenset[str]:
    """The architectures whose llama.cpp graph sizes every layer by the first layer's PER_LAYER_KEYS
    (LLAMA_LOAD_LOCALS in llama-model.h: hparams.n_head_kv(), n_expert_used(), ... of layer 0) while its KV cache
    takes each layer's own: the MoE families of mc-gguf's table (hf/architectures.py)."""
    import gguf

    from mc_gguf.hf.architectures import ARCHITECTURES

    return frozenset(gguf.MODEL_ARCH_NAMES[a.gguf_arch] for a in ARCHITECTURES.values())


def file_kind(header: GGUFHeader) -> str | None:
    """What a GGUF that is not a language model is ("a LoRA adapter", "a multimodal projector"), or None."""
    kind = header.get("general.type")
    if kind == "adapter" or header.get("adapter.type") is not None:
        return "a LoRA adapter (llama.cpp's --lora takes it, with the model it adapts)"
    if kind in ("mmproj", "clip-vision", "clip") or header.architecture == "clip":
        return "a multimodal projector (llama.cpp's --mmproj takes it, with its model)"
    return None


def model_problem(header: GGUFHeader) -> str | None:
    """Why llama.cpp would abort (or refuse) loading ``header`` as a model, or None when it would not."""
    kind = file_kind(header)
    if kind:
        return f"this is {kind}, not a model"
    arch = header.architecture
    if arch is None:
        return "general.architecture is missing (or not a string)"
    g = header.get

    def whole(key: str, required: bool = False) -> int | None | str:
        value = g(f"{arch}.{key}")
        if value is None:
            return f"{arch}.{key} is missing" if required else None
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{arch}.{key} must be a whole number, the file has {_shown(value)}"
        return value

    n_layer = whole("block_count", required=True)
    if isinstance(n_layer, str):
        return n_layer
    if not 1 <= n_layer <= LLAMA_MAX_LAYERS:
        return f"{arch}.block_count is {n_layer}; llama.cpp loads 1 to {LLAMA_MAX_LAYERS} layers"
    if arch in first_layer_architectures():
        for key in PER_LAYER_KEYS:
            value = g(f"{arch}.{key}")
            if isinstance(value, np.ndarray) and len(np.unique(value)) > 1:
                return (f"{arch}.{key} differs between layers ({', '.join(map(str, value[:8].tolist()))}"
                        f"{', ...' if len(value) > 8 else ''}); llama.cpp's {arch} graph takes the first layer's for "
                        "every layer, its cache each layer's own")
    values = {}
    for key in ("nextn_predict_layers", "expert_count", "expert_group_count", "expert_group_used_count",
                "context_length", "embedding_length"):
        value = whole(key)
        if isinstance(value, str):
            return value
        if value is not None and value < 0:
            return f"{arch}.{key} is {value}; it must not be negative"
        values[key] = value or 0
    if values["nextn_predict_layers"] > n_layer:
        return f"{arch}.nextn_predict_layers is {values['nextn_predict_layers']}, more than the {n_layer} layers"
    n_expert = values["expert_count"]
    if n_expert > LLAMA_MAX_EXPERTS:
        return f"{arch}.expert_count is {n_expert}; llama.cpp loads at most {LLAMA_MAX_EXPERTS} experts"
    used = g(f"{arch}.expert_used_count")
    if isinstance(used, np.ndarray):
        if used.dtype.kind not in "iu":
            return f"{arch}.expert_used_count must hold whole numbers"
        if len(used) != n_layer:
            return f"{arch}.expert_used_count has {len(used)} values, one per layer is {n_layer}"
        used_max = int(used.max()) if len(used) else 0
        if (used < 0).any():
            return f"{arch}.expert_used_count has a negative value"
    elif used is None:
        used_max = 0
    elif isinstance(used, bool) or not isinstance(used, int) or used < 0:
        return f"{arch}.expert_used_count must be a whole number (or one per layer), the file has {_shown(used)}"
    else:
        used_max = used
    groups, group_used = values["expert_group_count"], values["expert_group_used_count"]
    if n_expert:
        if not 1 <= used_max <= n_expert:
            return f"{arch}.expert_used_count is {used_max}; with {n_expert} experts it must be 1 to {n_expert}"
        if groups >= n_expert:
            return f"{arch}.expert_group_count is {groups}; it must be below the {n_expert} experts"
        if groups > 1 and (n_expert % groups or not 0 < group_used < groups):
            return (f"{arch}.expert_group_count {groups} must divide the {n_expert} experts and "
                    f"{arch}.expert_group_used_count ({group_used}) be 1 to {groups - 1}")
    elif used_max or groups:
        return f"{arch}.expert_used_count or expert_group_count is set, but the model has no experts (expert_count)"
    rope = g(f"{arch}.rope.scaling.type")
    if rope is not None and rope not in ROPE_SCALING_TYPES:
        return f"{arch}.rope.scaling.type is {_shown(rope)}; llama.cpp knows {', '.join(ROPE_SCALING_TYPES)}"
    for key in ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon"):
        eps = g(f"{arch}.{key}")
        if eps is not None and not (isinstance(eps, (int, float)) and not isinstance(eps, bool)
                                    and math.isfinite(eps) and eps >= 0):
            return f"{arch}.{key} is {_shown(eps)}; it must be a finite number, at least 0"
    for key in ("rope.freq_base", "rope.scaling.factor"):
        value = g(f"{arch}.{key}")
        if isinstance(value, float) and not math.isfinite(value):
            return f"{arch}.{key} is {value}; it must be finite"
    for t in header.tensors:
        if t.type != F32 and len(t.shape) == 1:
            # llama.cpp writes them F32 (convert_hf_to_gguf.py; llama-quantize leaves 1-D tensors alone), and ggml's
            # CPU add and mul take an F32 activation with an F32 operand only (binary-ops.cpp: apply_binary_op
            # aborts on "unsupported types")
            return f"tensor {t.name} is of ggml type {t.type}; norms and biases (1-D tensors) must be F32 (0)"
        if t.type in NO_DOT_PRODUCT:
            return (f"tensor {t.name} is {NO_DOT_PRODUCT[t.type]}, a type ggml's CPU backend has no dot product for "
                    "(llama.cpp crashes at the first token); weights are float or quantized types")
    return _vocab_problem(header)


def _vocab_problem(header: GGUFHeader) -> str | None:
    model = header.get("tokenizer.ggml.model")
    model = model if isinstance(model, str) else None  # another type: llama.cpp refuses it with its reason
    if model in NO_VOCAB:
        return (f"tokenizer.ggml.model is {model!r}: the file has no vocabulary, and llama.cpp aborts on the first "
                "text it tokenizes")
    tokens = header.get("tokenizer.ggml.tokens")
    if tokens is None:
        return None
    if not isinstance(tokens, list):
        return "tokenizer.ggml.tokens must be an array of strings"
    if not tokens:
        return "tokenizer.ggml.tokens is empty"
    # llama_vocab::load names an empty token "[EMPTY_<i>]", then asserts that no two tokens are the same
    named = [token or f"[EMPTY_{i}]" for i, token in enumerate(tokens)]
    if len(set(named)) != len(named):
        token, count = Counter(named).most_common(1)[0]
        return f"tokenizer.ggml.tokens holds {token!r} {count} times; every token must be distinct"
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        values = header.get(key)
        if values is not None and len(values) != len(tokens):
            return f"{key} has {len(values)} values for {len(tokens)} tokens"
    types = header.get("tokenizer.ggml.token_type")
    if model == "bert" and isinstance(types, np.ndarray) and (types == BYTE_TOKEN).any():
        # llama_vocab::impl::token_to_byte: GGML_ABORT for LLAMA_VOCAB_TYPE_WPM, reached while the pieces are cached
        first = int(np.argmax(types == BYTE_TOKEN))
        return f"tokenizer.ggml.token_type marks token {first} a byte, which llama.cpp's WPM (bert) tokenizer aborts on"
    for name in SPECIAL_TOKEN_KEYS:
        value = header.get(f"tokenizer.ggml.{name}_token_id")
        if isinstance(value, int) and not isinstance(value, bool) and not -1 <= value < len(tokens):
            return f"tokenizer.ggml.{name}_token_id is {value}, not one of the {len(tokens)} tokens"
    return None


def _shown(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of {len(value)}"
    if isinstance(value, list):
        return f"an array of {len(value)} strings"
    return repr(value)


def check_model(path: str | Path) -> GGUFHeader:
    """The header of a GGUF that llama.cpp can load as a model, or a GGUFFileError saying why it cannot."""
    header = scan(path)
    problem = model_problem(header)
    if problem:
        raise GGUFFileError(f"{header.path}: {problem}")
    return header


# the tokenizer.* keys that decide how text becomes token ids (llama_vocab::load)
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                  "tokenizer.ggml.token_type", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.bos_token_id")


def tokenizer_difference(a: GGUFHeader, b: GGUFHeader) -> str | None:
    """The first tokenizer key in which two GGUFs differ (so that they would turn a text into other token ids
    or logits over another vocabulary), or None."""
    for key in TOKENIZER_KEYS:
        x, y = a.get(key), b.get(key)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            same = isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and np.array_equal(x, y)
        else:
            same = x == y
        if not same:
            if key == "tokenizer.ggml.tokens" and isinstance(x, list) and isinstance(y, list) and len(x) != len(y):
                return f"{len(x)} and {len(y)} tokens"
            return f"their {key} differ"
    return None
