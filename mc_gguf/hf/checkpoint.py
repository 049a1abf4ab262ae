"""Read a Hugging Face checkpoint folder lazily: config, shard index, one tensor at a time.

Every shard's safetensors header is checked against the file size before any
work starts, so a truncated download fails at once with the shard's name
rather than half-way through a conversion.
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mc_gguf.errors import CheckpointError
from mc_gguf.hf.architectures import MoEArchitecture, architecture_for

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
        """(hidden size, expert intermediate size), from the first MoE layer's first expert's gate [F, H]."""
        ff, hidden = self.shape(self.arch.expert_tensor(self.moe_layers[0], 0, "gate"))
        return hidden, ff

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def load(self, name: str) -> np.ndarray:
        """One tensor as float32 numpy (bf16 is widened exactly), read from its shard on demand."""
        return self.load_torch(name).float().numpy()

    def load_torch(self, name: str):
        """One tensor as a torch tensor in the checkpoint's own dtype (bf16 stays bf16: half of float32).

        The bytes are read into the tensor (safetensors' little-endian layout):
        safetensors' own reader maps the whole shard and keeps it mapped, so
        every tensor read stays in the process's resident memory until the
        end (5 GB shards, the whole model for a converter). Dtypes torch reads
        plainly go this way; others through safetensors.
        """
        import torch

        entry = self._entry(name)
        dtype = getattr(torch, TORCH_DTYPES.get(entry.dtype, ""), None)
        if dtype is not None and sys.byteorder == "little":
            out = torch.empty(entry.shape, dtype=dtype)
            _read_into(entry.shard, entry.offset, out.view(-1).view(torch.uint8).numpy())
            return out
        from safetensors import safe_open

        handle = self._handles.get(entry.shard)
        if handle is None:
            handle = safe_open(str(entry.shard), framework="pt")
            self._handles[entry.shard] = handle
        return handle.get_tensor(name)

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name} is missing from the checkpoint") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: no {path.name} (is this a Hugging Face model folder?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


# config.json keys every stage reads, besides the architecture row's own
REQUIRED_CONFIG = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")

# the dtypes of the safetensors format (its Rust crate's Dtype)
# safetensors dtypes read straight into torch tensors (Checkpoint.load_torch)
TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}

SAFETENSORS_DTYPES = {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F16", "BF16", "F32", "F64",
                      "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64"}


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
    n_expert_key = expert_count_key(config, arch)
    for key in (*REQUIRED_CONFIG, n_expert_key, arch.n_expert_used_key):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            found = "it is missing" if value is None else f"it is {value!r}"
            raise CheckpointError(f"{path / 'config.json'}: {key} must be a positive whole number; {found}")
    groups = arch.expert_group_keys
    if groups:
        n_group, used = (config.get(key) or 1 for key in groups)
        if not (isinstance(n_group, int) and isinstance(used, int) and 1 <= used <= n_group
                and config[n_expert_key] % n_group == 0):
            raise CheckpointError(f"{path / 'config.json'}: {groups[0]} = {n_group!r} must divide the "
                                  f"{config[n_expert_key]} experts and {groups[1]} = {used!r} be in [1, {groups[0]}]")
    if config[arch.n_expert_used_key] > config[n_expert_key]:
        raise CheckpointError(f"{path / 'config.json'}: {arch.n_expert_used_key} = {config[arch.n_expert_used_key]} "
                              f"is more than the {config[n_expert_key]} experts ({n_expert_key})")


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse a shard's header and check that every tensor's bytes are inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors header")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: shard {path.name} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header") from None
    data_size = size - 8 - header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or "data_offsets" not in info or "shape" not in info:
            raise CheckpointError(f"{path}: corrupt safetensors header (entry {name})")
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {info.get('dtype')!r}, which is not a "
                                  "safetensors dtype (a corrupt or newer file)")
        begin, end = info["data_offsets"]
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated safetensors file ({size} bytes; tensor {name} ends at byte {8 + header_len + end})"
            )
        entries[name] = TensorEntry(shard=path, dtype=info["dtype"], shape=tuple(info["shape"]),
                                    offset=8 + header_len + begin, nbytes=end - begin)
    return entries


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
    """Open a model folder: config.json, then a single safetensors file or an index of shards."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder")
    config = _read_json(path / "config.json")
    arch = architecture_for(config)
    _check_config(path, config, arch)
    if (path / INDEX_FILE).exists():
        weight_map = _read_json(path / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path / INDEX_FILE}: no weight_map")
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
    return Checkpoint(path=path, config=config, arch=arch, tensors=tensors)
