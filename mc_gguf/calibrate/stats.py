"""Calibration statistics: what `mc-gguf calibrate` measures, as one file a person can open.

The file is safetensors (arrays, readable with ``safetensors.numpy.load_file``)
whose header metadata holds one JSON object, ``mc_gguf.calibrate.stats``, with the
provenance (model, text hash, token count, seed, candidate types).

Arrays, per MoE layer N (a dense layer, listed in the header's ``dense_layers``, has none; E experts, H hidden size, F expert intermediate size,
T candidate types, k experts per token):

    blk.N.count          [E]       (token, slot) pairs routed to each expert
    blk.N.weight_sum     [E]       sum of the expert's router probability (softmax over all
                                   experts, or GLM4-MoE's sigmoid; before top-k renormalisation)
                                   over those tokens
    blk.N.top_ratio      [tokens, k-1]  w_i / w_0 of every calibration token (slots by descending
                                   weight, w_0 the top weight)
    blk.N.imatrix_in     [E, H]    sum of x^2 over the expert's tokens (gate/up input)
    blk.N.imatrix_mid    [E, F]    sum of z^2, z = act(gate x) * (up x) (down input)
    blk.N.eps            [3, E, T] output error with only this expert at type t:
                                   [0] all projections, [1] gate+up only, [2] down only
    blk.N.skip_cost      [tokens, k-1]  ||change of the block output||^2 / ||hidden state||^2 of
                                   every calibration token if its slot i alone were skipped
                                   (the layer's output hidden state; Online Dynamic Pruning's cost)
    blk.N.hessian_in     [E, H, H] sum of g^2 x x^T, g the routing weight the token gave the expert (--hessian)
    blk.N.hessian_mid    [E, F, F] sum of g^2 z z^T (only with --hessian)
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from mc_gguf.atomic import atomic_output
from mc_gguf.errors import McGgufError

METADATA_KEY = "mc_gguf.stats"
FORMAT_VERSION = 1

# eps rows: which projections of the expert were quantized
EPS_EXPERT, EPS_GATE_UP, EPS_DOWN = 0, 1, 2


class StatsFileError(McGgufError):
    """A calibration statistics file is missing, corrupt or of another kind."""


@dataclass
class LayerStats:
    count: np.ndarray
    weight_sum: np.ndarray
    top_ratio: np.ndarray
    imatrix_in: np.ndarray
    imatrix_mid: np.ndarray
    eps: np.ndarray
    skip_cost: np.ndarray | None = None
    hessian_in: np.ndarray | None = None
    hessian_mid: np.ndarray | None = None

    @property
    def phi(self) -> np.ndarray:
        """Access frequency, normalised so the layer's experts sum to 1 (METHOD.md)."""
        return _normalised(self.count)

    @property
    def w(self) -> np.ndarray:
        """Activation weight, normalised so the layer's experts sum to 1 (METHOD.md)."""
        return _normalised(self.weight_sum)

    def imatrix(self, which: str) -> np.ndarray:
        """Per-expert importance [E, n]: the mean of x^2 over the expert's tokens, as llama-imatrix
        stores it; an expert no token reached gets ones (no preference)."""
        sums = self.imatrix_in if which == "in" else self.imatrix_mid
        counts = self.count.astype(np.float64)[:, None]
        return np.where(counts > 0, sums / np.maximum(counts, 1), 1.0).astype(np.float32)

    def hessian(self, which: str) -> np.ndarray | None:
        """Per-expert Hessians [E, n, n] of the projections' inputs ("in": gate and up, "mid": down), or None
        without --hessian."""
        return self.hessian_in if which == "in" else self.hessian_mid


def _normalised(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    total = values.sum()
    return values / total if total > 0 else np.full_like(values, 1.0 / len(values))


@dataclass
class CalibrationStats:
    info: dict                       # provenance: model, text, tokens, seed, ...
    types: list[str]                 # candidate types, the columns of every eps
    layers: list[LayerStats | None] = field(default_factory=list)  # None: a dense layer (no experts)

    @property
    def moe_layers(self) -> list[tuple[int, LayerStats]]:
        """(block index, statistics) of every layer with experts."""
        return [(bid, layer) for bid, layer in enumerate(self.layers) if layer is not None]

    @property
    def n_experts(self) -> int:
        return int(self.moe_layers[0][1].count.size)

    def measured_on(self, ckpt) -> bool:
        """Were these statistics measured on a model of ``ckpt``'s layers, MoE layers and experts?"""
        return (len(self.layers) == ckpt.n_layers and [bid for bid, _ in self.moe_layers] == ckpt.moe_layers
                and self.n_experts == ckpt.n_experts)

    @property
    def has_hessian(self) -> bool:
        return bool(self.moe_layers) and self.moe_layers[0][1].hessian_in is not None

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        with atomic_output(path) as tmp:
            save_file(layer_arrays(self.layers), str(tmp), metadata={METADATA_KEY: json.dumps(self.header())})
        return Path(path)

    def header(self) -> dict:
        return {"format": FORMAT_VERSION, "types": self.types, **self.info}


def layer_arrays(layers: list[LayerStats | None], first: int = 0) -> dict[str, np.ndarray]:
    arrays = {}
    for il, layer in enumerate(layers, start=first):
        if layer is None:
            continue
        for f in fields(LayerStats):
            value = getattr(layer, f.name)
            if value is not None:
                arrays[f"blk.{il}.{f.name}"] = np.ascontiguousarray(value)
    return arrays


def read_layers(arrays: dict[str, np.ndarray], n_layers: int, first: int = 0,
                dense: Collection[int] = ()) -> list[LayerStats | None]:
    optional = {"hessian_in", "hessian_mid", "skip_cost"}
    layers = []
    for il in range(first, first + n_layers):
        if il in dense:
            layers.append(None)
            continue
        values = {f.name: arrays.get(f"blk.{il}.{f.name}") for f in fields(LayerStats)}
        missing = [name for name, value in values.items() if value is None and name not in optional]
        if missing:
            raise StatsFileError(f"layer {il} has no {', '.join(missing)} in the statistics")
        layers.append(LayerStats(**values))
    return layers


def load_stats(path: str | Path) -> CalibrationStats:
    """Read a file written by :meth:`CalibrationStats.save`, with clear errors for anything else."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise StatsFileError(f"statistics file {path} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            if METADATA_KEY not in metadata:
                raise StatsFileError(f"{path} is a safetensors file but not mc-gguf calibration statistics")
            header = json.loads(metadata[METADATA_KEY])
            arrays = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise StatsFileError(f"{path} is not a readable statistics file ({exc})") from None
    if header.get("format") != FORMAT_VERSION:
        raise StatsFileError(f"{path} has statistics format {header.get('format')}; this mc-gguf reads {FORMAT_VERSION}")
    types = header.pop("types")
    header.pop("format")
    layers = read_layers(arrays, int(header["n_layer"]), dense=header.get("dense_layers") or ())
    for il, layer in enumerate(layers):
        if layer is not None and layer.eps.shape[-1] != len(types):
            raise StatsFileError(f"{path}: layer {il} has errors for {layer.eps.shape[-1]} types, header names {len(types)}")
    return CalibrationStats(info=header, types=types, layers=layers)
