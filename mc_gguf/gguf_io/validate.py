"""Check a GGUF before anything else reads it: the file's structure as ggml's gguf.cpp reads it, and the
hyper-parameters llama.cpp's loader asserts on (aborting the process) rather than refusing with a reason.

``scan`` walks the header with every count and length bounded by the bytes
left in the file, so a corrupt or hostile file (an array declared 2^40 long,
a tensor count of 10^18) is refused at once instead of making gguf-py or
llama.cpp allocate or loop. It mirrors gguf_init_from_file_impl
(ggml/src/gguf.cpp): the magic and version, keys unique and non-empty, value
types known and arrays not nested, strings and arrays inside the file and
under GGUF_MAX_STRING_LENGTH / GGUF_MAX_ARRAY_ELEMENTS, general.alignment a
power of two, tensor names unique and shorter than GGML_MAX_NAME, at most
GGML_MAX_DIMS dimensions, a known ggml type whose block divides the row,
and the tensors' data laid out back to back in table order, each padded to
the alignment (gguf.cpp: "tensor '%s' has offset %zu, expected %zu"), inside
the file (llama_model_loader: "tensor data is not within the file bounds").

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
import mmap
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mc_gguf.errors import GGUFFileError

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)               # gguf.cpp reads v2 and v3; v1 is refused
GGUF_MAX_STRING_LENGTH = 1 << 30     # gguf.cpp
GGUF_MAX_ARRAY_ELEMENTS = 1 << 30    # gguf.cpp
GGUF_DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4                    # ggml.h
GGML_MAX_NAME = 64                   # ggml.h: names are shorter than this
LLAMA_MAX_LAYERS = 512               # llama-hparams.h
LLAMA_MAX_EXPERTS = 1024             # llama-hparams.h
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # llama-model.cpp: LLAMA_ROPE_SCALING_TYPES

# gguf.h's enum gguf_type: the numpy dtype of each scalar type (8: string, 9: array)
STRING, ARRAY = 8, 9
SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
           12: "<f8"}
BOOL = 7
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


def _ggml_sizes() -> dict[int, tuple[int, int]]:
    """(block size, bytes per block) of each ggml type gguf-py knows: ggml_blck_size / ggml_type_size."""
    import gguf

    return {int(t): sizes for t, sizes in gguf.GGML_QUANT_SIZES.items()}


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]   # ggml's ne: the row length first
    type: int                # ggml_type
    offset: int              # from the start of the data section
    nbytes: int


@dataclass
class GGUFHeader:
    path: Path
    version: int
    fields: dict[str, Any] = field(default_factory=dict)      # key -> value (arrays: numpy arrays or lists of str)
    types: dict[str, tuple[int, ...]] = field(default_factory=dict)  # key -> (type,) or (ARRAY, element type)
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int = 0
    file_size: int = 0

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    @property
    def architecture(self) -> str | None:
        arch = self.fields.get("general.architecture")
        return arch if isinstance(arch, str) else None


class _Cursor:
    """Reads little-endian values from a buffer, every read bounded by the bytes left."""

    def __init__(self, path: Path, buffer):
        self.path, self.buffer, self.pos = path, buffer, 0

    def left(self) -> int:
        return len(self.buffer) - self.pos

    def take(self, n: int, what: str) -> bytes:
        """The next ``n`` bytes, copied: a view into the memory map would still be exported while an error raised
        with it in a frame of its traceback leaves the map's ``with`` block, whose close then fails."""
        if n < 0 or n > self.left():
            raise GGUFFileError(f"{self.path}: truncated or corrupt: {what} needs {n} bytes, {self.left()} are left")
        start, self.pos = self.pos, self.pos + n
        return self.buffer[start:self.pos]

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        if n > GGUF_MAX_STRING_LENGTH:
            raise GGUFFileError(f"{self.path}: {what} is {n} bytes long, more than GGUF allows ({GGUF_MAX_STRING_LENGTH})")
        raw = self.take(n, what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise GGUFFileError(f"{self.path}: {what} is not UTF-8 text") from None


def scan(path: str | Path) -> GGUFHeader:
    """The header of the GGUF at ``path``, checked as gguf.cpp checks it, or a GGUFFileError naming the fault."""
    path = Path(path)
    try:
        if not path.is_file():
            raise GGUFFileError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
        with open(path, "rb") as f:
            size = path.stat().st_size
            if size < 24:
                raise GGUFFileError(f"{path}: not a GGUF file ({size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
                return _scan(path, buffer, size)
    except OSError as exc:
        raise GGUFFileError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def _scan(path: Path, buffer, size: int) -> GGUFHeader:
    cur = _Cursor(path, buffer)
    if bytes(cur.take(4, "the magic")) != GGUF_MAGIC:
        raise GGUFFileError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
    version = cur.unpack("<I", "the version")
    if version not in GGUF_VERSIONS:
        raise GGUFFileError(f"{path}: GGUF version {version}; llama.cpp reads versions 2 and 3")
    n_tensors, n_kv = cur.unpack("<q", "the tensor count"), cur.unpack("<q", "the key count")
    # a key takes at least 13 bytes (name length, one-byte name, type), a tensor entry at least 29
    for count, least, what in ((n_kv, 13, "keys"), (n_tensors, 29, "tensors")):
        if count < 0 or count * least > cur.left():
            raise GGUFFileError(f"{path}: the header declares {count} {what}, more than the file could hold")
    header = GGUFHeader(path=path, version=version, file_size=size)
    for i in range(n_kv):
        key = cur.string(f"key {i}'s name")
        if not key:
            raise GGUFFileError(f"{path}: key {i} has an empty name")
        if key in header.fields:
            raise GGUFFileError(f"{path}: key {key} appears twice")
        header.types[key], header.fields[key] = _value(cur, key)
    alignment = header.fields.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if "general.alignment" in header.fields and header.types["general.alignment"] != (4,):
        raise GGUFFileError(f"{path}: general.alignment must be a uint32")
    if not (isinstance(alignment, int) and alignment > 0 and alignment & (alignment - 1) == 0):
        raise GGUFFileError(f"{path}: general.alignment {alignment} is not a power of two")
    sizes = _ggml_sizes()
    names: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"tensor {i}'s name")
        if len(name.encode()) >= GGML_MAX_NAME:
            raise GGUFFileError(f"{path}: tensor name {name[:80]!r} is longer than ggml allows ({GGML_MAX_NAME - 1})")
        if name in names:
            raise GGUFFileError(f"{path}: tensor {name} appears twice")
        names.add(name)
        n_dims = cur.unpack("<I", f"tensor {name}'s dimensions")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise GGUFFileError(f"{path}: tensor {name} has {n_dims} dimensions; ggml's tensors have 1 to "
                                f"{GGML_MAX_DIMS}")
        shape = tuple(cur.unpack("<q", f"tensor {name}'s shape") for _ in range(n_dims))
        if any(d < 1 for d in shape):
            raise GGUFFileError(f"{path}: tensor {name} has shape {list(shape)}: every dimension must be at least 1")
        ggml_type = cur.unpack("<i", f"tensor {name}'s type")
        offset = cur.unpack("<Q", f"tensor {name}'s offset")
        if ggml_type not in sizes:
            raise GGUFFileError(f"{path}: tensor {name} has ggml type {ggml_type}, which is not a type ggml reads")
        block, block_bytes = sizes[ggml_type]
        if shape[0] % block:
            raise GGUFFileError(f"{path}: tensor {name}'s rows of {shape[0]} are not whole blocks of {block} "
                                f"(its type's block)")
        n_elements = math.prod(shape)
        nbytes = n_elements // block * block_bytes
        if nbytes > size:
            raise GGUFFileError(f"{path}: tensor {name} of shape {list(shape)} would take {nbytes} bytes, more "
                                f"than the file's {size}")
        header.tensors.append(TensorInfo(name, shape, ggml_type, offset, nbytes))
    header.data_offset = -(-cur.pos // alignment) * alignment
    expected = 0
    for t in header.tensors:
        if t.offset != expected:
            raise GGUFFileError(f"{path}: tensor {t.name}'s data is at offset {t.offset}, where llama.cpp expects "
                                f"{expected} (tensors are stored back to back, in table order, aligned to "
                                f"{alignment} bytes): the file is corrupt")
        expected += -(-t.nbytes // alignment) * alignment
        if header.data_offset + t.offset + t.nbytes > size:
            raise GGUFFileError(f"{path}: truncated: tensor {t.name}'s data ends at byte "
                                f"{header.data_offset + t.offset + t.nbytes}, the file has {size}")
    return header


def _value(cur: _Cursor, key: str) -> tuple[tuple[int, ...], Any]:
    value_type = cur.unpack("<i", f"{key}'s type")
    if value_type == ARRAY:
        element = cur.unpack("<i", f"{key}'s element type")
        n = cur.unpack("<Q", f"{key}'s length")
        if element == ARRAY:
            raise GGUFFileError(f"{cur.path}: {key} is an array of arrays, which GGUF readers do not take")
        least = 8 if element == STRING else np.dtype(SCALARS[element]).itemsize if element in SCALARS else 0
        if not least:
            raise GGUFFileError(f"{cur.path}: {key} has element type {element}, which is not a GGUF type")
        if n > GGUF_MAX_ARRAY_ELEMENTS or n * least > cur.left():
            raise GGUFFileError(f"{cur.path}: {key} declares {n} elements, more than the file could hold")
        if element == STRING:
            return (ARRAY, STRING), [cur.string(f"{key}[{i}]") for i in range(n)]
        dtype = np.dtype(SCALARS[element])
        values = np.frombuffer(cur.take(n * dtype.itemsize, key), dtype=dtype).copy()
        return (ARRAY, element), values.astype(bool) if element == BOOL else values
    if value_type == STRING:
        return (STRING,), cur.string(key)
    if value_type not in SCALARS:
        raise GGUFFileError(f"{cur.path}: {key} has type {value_type}, which is not a GGUF type")
    dtype = np.dtype(SCALARS[value_type])
    value = np.frombuffer(cur.take(dtype.itemsize, key), dtype=dtype)[0]
    return (value_type,), bool(value) if value_type == BOOL else value.item()


# ---------------------------------------------------------------------------------------------------------------
# what the model loader asserts on

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
