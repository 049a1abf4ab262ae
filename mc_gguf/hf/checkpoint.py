"""Read a Hugging Face checkpoint folder lazily: config, shard index, one tensor at a time.

Every shard's safetensors header is checked against the file size before any
work starts, so a truncated download fails at once with the shard's name
rather than half-way through a conversion.
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mc_gguf.errors import CheckpointError
from mc_gguf.hf.architectures import MoEArchitecture, architecture_for
from mc_gguf.hf.hub import model_folder

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class TensorEntry:
    shard: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0   # of its first byte in the shard file
    nbytes: int = 0


@dataclass
class Checkpoint:
    path: Path
    config: dict
    arch: MoEArchitecture
    tensors: dict[str, TensorEntry]
    _handles: dict[Path, object] = field(default_factory=dict, repr=False)
    # the rows of stacked expert tensors last read, by tensor name, and their index: gpt-oss's gate and up
    # share one row (and its MXFP4 blocks and scales), read once for both
    _rows: tuple[tuple[str, int], dict[str, object]] = field(default=(("", -1), {}), repr=False)

    @property
    def n_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def moe_layers(self) -> list[int]:
        """The layers with routed experts; the others (leading_dense_key) have a dense FFN, which is not an
        expert and is converted as the attention is."""
        dense = set(dense_layers(self.config))
        return [bid for bid in range(self.n_layers) if bid not in dense]

    def is_moe(self, bid: int) -> bool:
        return bid not in dense_layers(self.config)

    @property
    def routed_scale(self) -> float:
        """The factor the routed experts' weights are multiplied by (1 unless the row names a config key)."""
        key = self.arch.routed_scale_key
        value = self.config.get(key) if key else None
        return float(value) if value is not None else 1.0

    @property
    def expert_groups(self) -> tuple[int, int]:
        """(groups of experts, groups a token chooses from): (1, 1) where the family has none."""
        keys = self.arch.expert_group_keys
        return (int(self.config.get(keys[0]) or 1), int(self.config.get(keys[1]) or 1)) if keys else (1, 1)

    @property
    def n_experts(self) -> int:
        return int(self.config[expert_count_key(self.config, self.arch)])

    @property
    def norm_topk_prob(self) -> bool:
        """Are a token's top-k routing weights renormalised to sum to 1 (config.json, else the row's default)?"""
        key = self.arch.norm_topk_key
        return bool(self.config.get(key, self.arch.norm_topk_prob)) if key else self.arch.norm_topk_prob

    @property
    def n_experts_used(self) -> int:
        return int(self.config[self.arch.n_expert_used_key])

    @property
    def expert_dims(self) -> tuple[int, int]:
        """(hidden size, expert intermediate size), from the first MoE layer's gate [F, H]."""
        ff, hidden = self.expert_shape(self.moe_layers[0], "gate")
        return hidden, ff

    def expert_shape(self, bid: int, projection: str) -> tuple[int, int]:
        """(rows, columns) of every expert's ``projection`` in layer ``bid``, checked to be there and alike."""
        arch, n = self.arch, self.n_experts
        if arch.expert_storage == "per-expert":
            names = [arch.expert_source(bid, xid, projection).tensor for xid in range(n)]
            missing = [name for name in names if name not in self.tensors]
            if missing:
                raise CheckpointError(f"{self.path}: expert tensor {missing[0]} is missing ({len(missing)} in layer "
                                      f"{bid}'s {projection})")
            shapes = {self.shape(name) for name in names}
            if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                raise CheckpointError(f"{self.path}: experts of layer {bid} ({projection}) have shapes "
                                      f"{sorted(shapes)}, not one [rows, columns]")
            return shapes.pop()
        source = arch.expert_source(bid, 0, projection)
        start, step = source.columns
        if self._mxfp4(source.tensor):
            blocks, scales = (self.shape(f"{source.tensor}_{part}") for part in ("blocks", "scales"))
            if len(blocks) != 4 or blocks[0] != n or blocks[3] != MXFP4_BLOCK // 2 or scales != blocks[:3]:
                raise CheckpointError(f"{self.path}: {source.tensor}_blocks {list(blocks)} and _scales {list(scales)} "
                                      f"are not MXFP4 blocks [{n} experts, out, blocks, 16] and their scales")
            shape = (n, blocks[2] * MXFP4_BLOCK, blocks[1])  # as the unquantized tensor's [E, in, out]
        else:
            shape = self.shape(source.tensor)
        if len(shape) != 3 or shape[0] != n or shape[2] % step:
            raise CheckpointError(f"{self.path}: {source.tensor} has shape {list(shape)}, not [{n} experts, in, out]")
        if source.bias is not None and self.shape(source.bias) != (n, shape[2]):
            raise CheckpointError(f"{self.path}: {source.bias} has shape {list(self.shape(source.bias))}, "
                                  f"not [{n}, {shape[2]}]")
        return shape[2] // step, shape[1]

    def expert_weight(self, bid: int, xid: int, projection: str) -> np.ndarray:
        """One expert's projection [rows, columns] as float32 numpy (see expert_weight_torch)."""
        return self.expert_weight_torch(bid, xid, projection).float().numpy()

    def expert_weight_torch(self, bid: int, xid: int, projection: str):
        """One expert's projection [rows, columns] (as llama.cpp's ffn_*_exps hold each expert) in the
        checkpoint's dtype (MXFP4: bfloat16, exactly); of a stacked tensor only that expert's row is read."""
        source = self.arch.expert_source(bid, xid, projection)
        if source.index is None:
            return self.load_torch(source.tensor)
        start, step = source.columns
        if self._mxfp4(source.tensor):
            blocks, scales = (self._stacked_row(source.tensor, source.index, f"_{part}") for part in ("blocks", "scales"))
            return mxfp4_dequantize(blocks[start::step], scales[start::step])
        return self._stacked_row(source.tensor, source.index)[:, start::step].T.contiguous()

    def _stacked_row(self, tensor: str, index: int, part: str = ""):
        if self._rows[0] != (tensor, index):
            self._rows = ((tensor, index), {})  # another expert: the last one's rows go
        rows = self._rows[1]
        if part not in rows:
            rows[part] = self.load_torch(tensor + part, index)
        return rows[part]

    def expert_bias(self, bid: int, xid: int, projection: str):
        """One expert's projection bias [rows] as a float32 torch tensor, or None where the family has none."""
        source = self.arch.expert_source(bid, xid, projection)
        if source.bias is None:
            return None
        start, step = source.columns
        return self.load_torch(source.bias, source.index)[start::step].float().contiguous()

    def _mxfp4(self, stacked: str) -> bool:
        """Is a stacked expert tensor stored as MXFP4 blocks and scales (gpt-oss on the Hub: ``{name}_blocks``
        [E, out, in / 32, 16] uint8, ``{name}_scales`` [E, out, in / 32] uint8)?"""
        return stacked not in self.tensors and f"{stacked}_blocks" in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def load(self, name: str) -> np.ndarray:
        """One tensor as float32 numpy (bf16 is widened exactly), read from its shard on demand."""
        return self.load_torch(name).float().numpy()

    def load_torch(self, name: str, index: int | None = None):
        """One tensor (or, with ``index``, its row ``index`` of the first dimension) as a torch tensor in the
        checkpoint's own dtype (bf16 stays bf16: half of float32).

        The bytes are read into the tensor (safetensors' little-endian layout):
        safetensors' own reader maps the whole shard and keeps it mapped, so
        every tensor read stays in the process's resident memory until the
        end (5 GB shards, the whole model for a converter). Dtypes torch reads
        plainly go this way; others through safetensors.
        """
        import torch

        entry = self._entry(name)
        shape, offset = entry.shape, entry.offset
        if index is not None:
            shape = entry.shape[1:]
            offset += index * (entry.nbytes // entry.shape[0])
        dtype = getattr(torch, TORCH_DTYPES.get(entry.dtype, ""), None)
        if dtype is not None and sys.byteorder == "little":
            out = torch.empty(shape, dtype=dtype)
            _read_into(entry.shard, offset, out.view(-1).view(torch.uint8).numpy())
            return out
        from safetensors import safe_open

        handle = self._handles.get(entry.shard)
        if handle is None:
            handle = safe_open(str(entry.shard), framework="pt")
            self._handles[entry.shard] = handle
        return handle.get_tensor(name) if index is None else handle.get_slice(name)[index]

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name} is missing from the checkpoint") from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: no {path.name} (is this a Hugging Face model folder?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not valid JSON (nested too deeply to read)") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object (it holds {type(data).__name__})")
    return data


# config.json keys every stage reads, besides the architecture row's own
REQUIRED_CONFIG = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")

# safetensors dtypes read straight into torch tensors (Checkpoint.load_torch)
TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}

# the dtypes of the safetensors format and their bits per value (its Rust crate's Dtype::bitsize)
SAFETENSORS_DTYPES = {"BOOL": 8, "U8": 8, "I8": 8, "I16": 16, "U16": 16, "I32": 32, "U32": 32, "I64": 64, "U64": 64,
                      "F16": 16, "BF16": 16, "F32": 32, "F64": 64, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F4": 4,
                      "F6_E2M3": 6, "F6_E3M2": 6, "C64": 64}
# the dtypes of weights mc-gguf converts (gpt-oss's MXFP4 blocks and scales, U8, aside)
WEIGHT_DTYPES = ("F32", "F16", "BF16", "F64")
# safetensors' own limit on a header (MAX_HEADER_SIZE)
MAX_HEADER_SIZE = 100_000_000
# llama.cpp's limits (llama-hparams.h: LLAMA_MAX_LAYERS, LLAMA_MAX_EXPERTS)
MAX_LAYERS = 512
MAX_EXPERTS = 1024


# MXFP4 (OCP microscaling): blocks of 32 FP4 (E2M1) values, two per byte (the low nibble first), sharing one
# E8M0 scale 2^(s - 127); the values of the 16 codes, as transformers' integrations/mxfp4.py and ggml's
# kvalues_mxfp4 (doubled there, the scale halved) read them
MXFP4_BLOCK = 32
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def mxfp4_dequantize(blocks, scales):
    """MXFP4 rows [rows, n_blocks, 16] uint8 with their scales [rows, n_blocks] as bfloat16 [rows, n_blocks * 32]:
    exact (an FP4 value has at most 2 significant bits, its scale is a power of two within bfloat16's exponent
    range) at half the memory of float32."""
    import torch

    lut = torch.tensor(FP4_E2M1, dtype=torch.float32)
    values = torch.stack((lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]), dim=-1)  # [rows, n, 16, 2]
    values = torch.ldexp(values.reshape(*blocks.shape[:2], MXFP4_BLOCK), scales.to(torch.int32)[..., None] - 127)
    return values.reshape(blocks.shape[0], -1).to(torch.bfloat16)


# gpt-oss's gated activation as llama.cpp's build_moe_ffn computes it (LLM_FFN_SWIGLU_OAI_MOE: alpha, limit)
SWIGLU_OAI = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}


def expert_count_key(config: dict, arch: MoEArchitecture) -> str:
    """The config.json key holding the expert count: the first of the row's keys present (the first if none)."""
    return next((key for key in arch.n_expert_keys if key in config), arch.n_expert_keys[0])


def dense_layers(config: dict) -> list[int]:
    """Layers with a dense FFN instead of experts, from the keys the families use for them (Qwen2/3-MoE's
    mlp_only_layers and decoder_sparse_step, DeepSeek's first_k_dense_replace and moe_layer_freq)."""
    n_layers = int(config.get("num_hidden_layers") or 0)
    dense = set(config.get("mlp_only_layers") or [])
    step = config.get("decoder_sparse_step") or config.get("moe_layer_freq") or 1
    dense |= {bid for bid in range(n_layers) if (bid + 1) % step}
    dense |= set(range(min(int(config.get("first_k_dense_replace") or 0), n_layers)))
    return sorted(dense)


def _check_config(path: Path, config: dict, arch: MoEArchitecture) -> None:
    n_expert_key = expert_count_key(config, arch)
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
    dense = dense_layers(config)
    leading = int(config.get(arch.leading_dense_key) or 0) if arch.leading_dense_key else 0
    if dense != list(range(min(leading, int(config.get("num_hidden_layers") or 0)))):
        where = f"only the first {arch.leading_dense_key} layers" if arch.leading_dense_key else "no layer"
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
    if arch.expert_activation == "swiglu-oai":
        for key, value in SWIGLU_OAI.items():
            if config.get(key, value) != value:
                raise CheckpointError(f"{path / 'config.json'}: {key} = {config[key]!r}; llama.cpp's graph "
                                      f"(LLM_FFN_SWIGLU_OAI_MOE) computes with {value}")
    quantization = (config.get("quantization_config") or {}).get("quant_method")
    if quantization and not (quantization == "mxfp4" and arch.expert_storage == "stacked"):
        raise CheckpointError(f"{path / 'config.json'}: the weights are quantized ({quantization}); mc-gguf reads "
                              "full-precision checkpoints (and gpt-oss's MXFP4 experts). Save a dequantized copy "
                              "first (transformers: from_pretrained(..., dequantize=True), then save_pretrained)")
    if config[arch.n_expert_used_key] > config[n_expert_key]:
        raise CheckpointError(f"{path / 'config.json'}: {arch.n_expert_used_key} = {config[arch.n_expert_used_key]} "
                              f"is more than the {config[n_expert_key]} experts ({n_expert_key})")


# config.json values that must be positive where they are given (sizes, counts, epsilons, rope's base), and those
# that must not be negative; every number must be finite
POSITIVE_CONFIG = re.compile(r"(_size|_eps|_epsilon|^rope_theta|^head_dim|^max_position_embeddings|^num_.*_heads"
                             r"|^num_experts_per_tok|^n_routed_experts|^num_local_experts|^num_experts)$")
NON_NEGATIVE_CONFIG = re.compile(r"^(n_shared_experts|first_k_dense_replace|num_nextn_predict_layers|n_group"
                                 r"|topk_group|sliding_window|routed_scaling_factor)$")


# config.json values read as whole numbers where given (GGUF stores them as uint32; dense_layers counts with them)
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
    """The JSON type of every value a stage reads: whole numbers GGUF's uint32 holds, objects, lists of layers;
    and what mc-gguf's own converter writes, given."""
    where = path / "config.json"
    required = OWN_CONVERTER_CONFIG if arch.converter == "mc-gguf" else ()
    for key in required:
        if config.get(key) is None:
            raise CheckpointError(f"{where}: {key} is missing; {arch.hf_architecture}'s GGUF holds it")
    for key in (*WHOLE_CONFIG, *((arch.leading_dense_key,) if arch.leading_dense_key else ())):
        value = config.get(key)
        if value is not None and not (_whole(value) and value <= UINT32_MAX):
            raise CheckpointError(f"{where}: {key} is {value!r}; it must be a whole number below 2^32")
    for key in OBJECT_CONFIG:
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise CheckpointError(f"{where}: {key} is {config[key]!r}; it must be a JSON object")
    for key in LAYER_LIST_CONFIG:
        value = config.get(key)
        if value is not None and not (isinstance(value, list) and all(_whole(v) for v in value)):
            raise CheckpointError(f"{where}: {key} is {value!r}; it must be a list of layer indices")


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse a shard's header and check that every tensor's bytes are inside the file."""
    try:
        if not path.is_file():  # a FIFO would block the read below; a folder cannot be read
            raise CheckpointError(f"{path.parent}: shard {path.name} is missing" if not path.exists()
                                  else f"{path}: not a regular file")
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, MAX_HEADER_SIZE):
                raise CheckpointError(f"{path}: truncated or corrupt safetensors header")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: shard {path.name} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{path}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _header_entry(path, name, info, 8 + header_len)
    # as safetensors' own reader (Metadata::validate): the tensors' bytes cover the data back to back
    expected = 0
    for name, entry in sorted(entries.items(), key=lambda item: item[1].offset):
        begin = entry.offset - 8 - header_len
        if begin != expected:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name} starts at byte {begin} of the "
                                  f"data, where the tensor before it ends at {expected}")
        expected = begin + entry.nbytes
    if expected != data_size:
        what = "truncated safetensors file" if expected > data_size else "corrupt safetensors file"
        raise CheckpointError(f"{path}: {what} ({size} bytes; its tensors end at byte {8 + header_len + expected})")
    return entries


def _header_entry(path: Path, name: str, info, data_start: int) -> TensorEntry:
    """One tensor of a safetensors header, checked: a known dtype, a shape of whole numbers, offsets whose
    distance is the shape's bytes in that dtype."""
    if not isinstance(info, dict) or not {"data_offsets", "shape", "dtype"} <= set(info):
        raise CheckpointError(f"{path}: corrupt safetensors header (entry {name})")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has dtype {dtype!r}, which is not a safetensors dtype "
                              "(a corrupt or newer file)")
    if not (isinstance(shape, list) and all(_whole(d) for d in shape) and isinstance(offsets, list)
            and len(offsets) == 2 and all(_whole(o) for o in offsets) and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{path}: corrupt safetensors header (tensor {name}: shape {shape!r}, "
                              f"data_offsets {offsets!r})")
    bits = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
    begin, end = offsets
    if bits % 8 or bits // 8 != end - begin:
        raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name} of shape {shape} in {dtype} "
                              f"takes {bits / 8:g} bytes, its offsets give {end - begin}")
    return TensorEntry(shard=path, dtype=dtype, shape=tuple(shape), offset=data_start + begin, nbytes=end - begin)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_into(path: Path, offset: int, out: np.ndarray) -> None:
    """Fill the bytes of ``out`` from ``path`` at ``offset`` (reads of 1 GiB: one read() stops near 2 GiB)."""
    view = memoryview(out).cast("B")
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(view):
            n = f.readinto(view[done:done + (1 << 30)])
            if not n:
                raise CheckpointError(f"{path}: truncated while reading (at byte {offset + done})")
            done += n


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a model folder (or a Hugging Face cache folder, or a Hub id: hub.model_folder): config.json, then a
    single safetensors file or an index of shards."""
    path = model_folder(path)
    config = _read_json(path / "config.json")
    arch = architecture_for(config)
    _check_config(path, config, arch)
    if (path / INDEX_FILE).exists():
        weight_map = _read_json(path / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path / INDEX_FILE}: no weight_map")
        for shard in weight_map.values():
            _check_shard_name(path, shard)
        shards = sorted(set(weight_map.values()))
    elif (path / SINGLE_FILE).exists():
        weight_map, shards = None, [SINGLE_FILE]
    else:
        raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)")
    tensors: dict[str, TensorEntry] = {}
    for shard in shards:
        tensors.update(read_safetensors_header(path / shard))
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{path}: {len(missing)} tensors named in the index are not in their shards, e.g. {missing[0]}")
    ckpt = Checkpoint(path=path, config=config, arch=arch, tensors=tensors)
    _check_tensors(ckpt)
    return ckpt


def _check_shard_name(path: Path, shard) -> None:
    """A shard named by the index is a file name inside the model folder (or a folder below it), never an
    absolute path or one that climbs out with '..' (the shards of a Hugging Face cache snapshot are links to
    its blobs: where a name leads is not checked, what it says is)."""
    parts = Path(shard).parts if isinstance(shard, str) and shard else ()
    if not parts or Path(shard).is_absolute() or ".." in parts or "\0" in shard:
        raise CheckpointError(f"{path / INDEX_FILE}: the weight_map names shard {shard!r}; shards are files "
                              "inside the model folder")


def _check_tensors(ckpt: Checkpoint) -> None:
    """config.json against the tensors, before any work: the embedding [vocab_size, hidden_size], every MoE
    layer's router, the experts' shape against hidden_size and the intermediate size, and weights in a
    floating-point dtype (gpt-oss's MXFP4 blocks and scales aside)."""
    config, arch, where = ckpt.config, ckpt.arch, ckpt.path / "config.json"
    mxfp4 = (config.get("quantization_config") or {}).get("quant_method") == "mxfp4"
    for name, entry in ckpt.tensors.items():
        if entry.dtype not in WEIGHT_DTYPES and not (mxfp4 and entry.dtype == "U8"
                                                     and name.endswith(("_blocks", "_scales"))):
            raise CheckpointError(f"{ckpt.path}: tensor {name} is {entry.dtype}; mc-gguf converts weights stored "
                                  f"as {', '.join(WEIGHT_DTYPES)}")
    embed = ckpt.shape(arch.embed_tokens)
    if embed != (config["vocab_size"], config["hidden_size"]):
        raise CheckpointError(f"{where}: vocab_size {config['vocab_size']} and hidden_size {config['hidden_size']} "
                              f"disagree with {arch.embed_tokens} of shape {list(embed)}")
    for bid in ckpt.moe_layers:
        router = arch.router.format(bid=bid) + ".weight"
        if router not in ckpt.tensors:
            raise CheckpointError(f"{ckpt.path}: layer {bid}'s router {router} is missing (config.json has "
                                  f"num_hidden_layers = {ckpt.n_layers})")
    hidden, ff = ckpt.expert_dims
    expected_ff = config.get("moe_intermediate_size") or config.get("intermediate_size")
    if hidden != config["hidden_size"] or isinstance(expected_ff, int) and ff != expected_ff:
        key = "moe_intermediate_size" if config.get("moe_intermediate_size") else "intermediate_size"
        raise CheckpointError(f"{where}: hidden_size {config['hidden_size']} and {key} {expected_ff} disagree "
                              f"with the experts' [{ff}, {hidden}]")
