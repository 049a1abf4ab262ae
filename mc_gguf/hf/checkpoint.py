"""Read a Hugging Face checkpoint folder lazily: config, shard index, one tensor at a time.

Every shard's safetensors header is checked against the file size before any
work starts (hf/safetensors_io.py), so a truncated download fails at once with
the shard's name rather than half-way through a conversion; config.json is
checked against its architecture row (hf/config.py) and against the tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mc_gguf.errors import CheckpointError
from mc_gguf.hf.architectures import ExpertStorage, MoEArchitecture, architecture_for
from mc_gguf.hf.config import check_config
from mc_gguf.hf.hub import model_folder
from mc_gguf.hf.mxfp4 import PARTS, mxfp4_dequantize, stored_as_mxfp4, unquantized_shape
from mc_gguf.hf.safetensors_io import TensorEntry, read_safetensors_header, read_tensor

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# the dtypes of weights mc-gguf converts (gpt-oss's MXFP4 blocks and scales, U8, aside)
WEIGHT_DTYPES = ("F32", "F16", "BF16", "F64")


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
    def dense_layers(self) -> list[int]:
        """The layers with a dense FFN instead of routed experts (the row's dense_layers read from config.json)."""
        return self.arch.dense_layers.of(self.config)

    @property
    def moe_layers(self) -> list[int]:
        """The layers with routed experts; the others (dense_layers) have a dense FFN, which is not an
        expert and is converted as the attention is."""
        dense = set(self.dense_layers)
        return [bid for bid in range(self.n_layers) if bid not in dense]

    def is_moe(self, bid: int) -> bool:
        return bid not in self.dense_layers

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
        return int(self.config[self.arch.n_expert_key(self.config)])

    @property
    def norm_topk_prob(self) -> bool:
        """Are a token's top-k routing weights renormalised to sum to 1 (config.json, else the row's default)?"""
        return self.arch.renormalizes(self.config)

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
        if arch.expert_storage is ExpertStorage.PER_EXPERT:
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
        if stored_as_mxfp4(self.tensors, source.tensor):
            blocks, scales = (self.shape(f"{source.tensor}_{part}") for part in PARTS)
            shape = unquantized_shape(blocks, scales, n)
            if shape is None:
                raise CheckpointError(f"{self.path}: {source.tensor}_blocks {list(blocks)} and _scales {list(scales)} "
                                      f"are not MXFP4 blocks [{n} experts, out, blocks, 16] and their scales")
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
        if stored_as_mxfp4(self.tensors, source.tensor):
            blocks, scales = (self._stacked_row(source.tensor, source.index, f"_{part}") for part in PARTS)
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

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def load(self, name: str) -> np.ndarray:
        """One tensor as float32 numpy (bf16 is widened exactly), read from its shard on demand."""
        return self.load_torch(name).float().numpy()

    def load_torch(self, name: str, index: int | None = None):
        """One tensor (or, with ``index``, its row ``index`` of the first dimension) as a torch tensor in the
        checkpoint's own dtype (bf16 stays bf16: half of float32).

        Dtypes torch reads plainly are read into a tensor of their own (safetensors_io.read_tensor), others
        through safetensors' own reader.
        """
        entry = self._entry(name)
        out = read_tensor(entry, index)
        if out is not None:
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


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a model folder (or a Hugging Face cache folder, or a Hub id: hub.model_folder): config.json, then a
    single safetensors file or an index of shards."""
    path = model_folder(path)
    config = _read_json(path / "config.json")
    arch = architecture_for(config)
    check_config(path, config, arch)
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
