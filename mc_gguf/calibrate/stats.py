"""Calibration statistics: what `mc-gguf calibrate` measures, as one file a person can open.

The file is safetensors (arrays, readable with ``safetensors.numpy.load_file``)
whose header metadata holds one JSON object, under ``mc_gguf.stats`` (METADATA_KEY), with the
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
                                   (the layer's output hidden state; Online Dynamic Pruning's cost),
                                   the kept weights renormalised as the router renormalises
    blk.N.drop_cost      [tokens, k-1]  the same with the kept weights left as they are
                                   (mc.odp.renormalize false)
    blk.N.slot_experts   [tokens, k-1]  int16, the expert of each of those slots
    blk.N.skip_mean      [E, H]    float32, the expert's output where a skip drops it: the mean of y over its
                                   slots i >= 1, weighted by a_i^2 (a_i the weight the block applied), the
                                   least-squares m of sum ||a_i y - a_i m||^2 (blk.N.ffn_odp_mean, prune/means.py)

With --hessian, what GPTQ and tuning build each expert's Hessians from when they quantize it (quantize/
hessian.py), rather than [E, H, H] and [E, F, F] sums per layer (7 GB a layer at Mixtral 8x7B's shapes):

    blk.N.moe_input      [tokens, H]  float32, the MoE block's input of every calibration token
    blk.N.routed_ids     [tokens, k]  int32, the experts of its slots (by descending weight)
    blk.N.routed_weights [tokens, k]  float32, the weights the block applied to them

``moe_input`` is read one layer at a time (CalibrationStats.moe_input), never with the rest.

The other weight matrices (calibrate/tensors.py), by GGUF name (``blk.0.attn_q.weight``, ``token_embd.weight``,
``output.weight``), U tensor types (the header's ``tensor_types``; none in files of earlier versions):

    tensor.NAME.error       [U]  output error with only this tensor at type u, in the units of eps
    tensor.NAME.importance  [n]  mean of x^2 over the calibration tokens of its input columns (llama-imatrix's);
                                 token_embd, a table of rows, has none

and with --hessian, what GPTQ and tuning quantize the tensor on (quantize/tensors.py):

    hessian.NAME            [n, n]  float32, sum of x x^T over the first HESSIAN_TOKENS calibration tokens of its
                                    input (calibrate/tensors.py), read one at a time (TensorStats.hessian)

How much the output feels a change of the residual stream where each layer adds to it (calibrate/fisher.py;
absent from files of earlier versions, whose errors then all count alike), L layers:

    fisher.mid              [L]  float64, tr(F) / H after the layer's attention (F: the Fisher information of the
                                 next token's distribution with respect to the residual stream there)
    fisher.out              [L]  float64, the same after the layer (its FFN's or experts' output added)
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from mc_gguf.atomic import atomic_output
from mc_gguf.errors import McGgufError
from mc_gguf.hf.safetensors_io import numpy_dtype, write_safetensors

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
    drop_cost: np.ndarray | None = None
    slot_experts: np.ndarray | None = None     # [tokens, k-1] int16: the expert of each slot top_ratio describes
    skip_mean: np.ndarray | None = None        # [E, H] float32: each expert's output where a skip drops it
    routed_ids: np.ndarray | None = None       # with --hessian
    routed_weights: np.ndarray | None = None

    @property
    def phi(self) -> np.ndarray:
        """Access frequency, normalised so the layer's experts sum to 1 (the paper's phi)."""
        return _normalised(self.count)

    @property
    def w(self) -> np.ndarray:
        """Activation weight, normalised so the layer's experts sum to 1 (the paper's w)."""
        return _normalised(self.weight_sum)

    def imatrix(self, which: str) -> np.ndarray:
        """Per-expert importance [E, n]: the mean of x^2 over the expert's tokens, as llama-imatrix
        stores it; an expert no token reached gets ones (no preference)."""
        sums = self.imatrix_in if which == "in" else self.imatrix_mid
        counts = self.count.astype(np.float64)[:, None]
        return np.where(counts > 0, sums / np.maximum(counts, 1), 1.0).astype(np.float32)


@dataclass
class TensorStats:
    """One of the other weight matrices (attention, token embeddings, output head): its error at each tensor type,
    the importance of its input columns (None for token_embd) and, with --hessian, how to read its input's
    Hessian [n, n] float32 (an array of Mixtral 8x7B's is 64 MB: it stays in its file until asked for)."""
    error: np.ndarray
    importance: np.ndarray | None = None
    hessian: Callable[[], np.ndarray] | None = None


TENSOR_PREFIX = "tensor."
HESSIAN_PREFIX = "hessian."
FISHER_PREFIX = "fisher."


@dataclass(frozen=True)
class Fisher:
    """tr(F) / H per layer at the two points where the layer adds to the residual stream (``mid``: its attention's
    output, ``out``: its FFN's or experts'): the KL divergence of the next token's distribution that a change d
    there costs, 1/2 d^T F d, is 1/2 |d|^2 tr(F) / H for a change of no preferred direction. The errors the
    allocation adds up are such |d| (eps, TensorStats.error), each priced where it is measured (``point``)."""
    mid: np.ndarray  # [L]
    out: np.ndarray  # [L]

    def point(self, gguf_name: str) -> float:
        """tr(F) / H where the error of GGUF tensor ``gguf_name`` is measured: the embeddings' at the first
        layer's output (calibrate/tensors.py), the output head's before the final norm (the last layer's output),
        a layer's attention after it, its other tensors (experts, shared experts, a dense FFN) after the layer."""
        if gguf_name.startswith("token_embd"):
            return float(self.out[0])
        if gguf_name.startswith("output"):
            return float(self.out[-1])
        _, bid, kind = gguf_name.split(".", 2)
        return float((self.mid if kind.startswith("attn") else self.out)[int(bid)])

    def relative(self, value: float) -> float:
        """``value`` (a point's tr(F) / H) over the mean of all points."""
        top = max(float(self.mid.max()), float(self.out.max()))  # divided first: no overflow on the way
        return value / top / float(np.concatenate([self.mid, self.out]).mean() / top)

    def arrays(self) -> dict[str, np.ndarray]:
        return {f"{FISHER_PREFIX}mid": np.asarray(self.mid, dtype=np.float64),
                f"{FISHER_PREFIX}out": np.asarray(self.out, dtype=np.float64)}


def tensor_arrays(tensors: dict[str, TensorStats]) -> dict[str, np.ndarray | Callable[[], np.ndarray]]:
    """The arrays of ``tensors`` by their names in the file, each Hessian as its reader."""
    arrays: dict[str, np.ndarray | Callable[[], np.ndarray]] = {}
    for name, stats in tensors.items():
        arrays[f"{TENSOR_PREFIX}{name}.error"] = np.ascontiguousarray(stats.error, dtype=np.float64)
        if stats.importance is not None:
            arrays[f"{TENSOR_PREFIX}{name}.importance"] = np.ascontiguousarray(stats.importance, dtype=np.float32)
        if stats.hessian is not None:
            arrays[f"{HESSIAN_PREFIX}{name}"] = stats.hessian
    return arrays


def read_tensors(arrays: dict[str, np.ndarray], path: Path | None = None, stored: Collection[str] = ()
                 ) -> dict[str, TensorStats]:
    """The tensors of ``arrays`` (a file's, without its Hessians), each with a reader of its Hessian where the
    file at ``path`` holds one (``stored``: the names of the file's arrays)."""
    names = sorted(key[len(TENSOR_PREFIX):-len(".error")] for key in arrays
                   if key.startswith(TENSOR_PREFIX) and key.endswith(".error"))
    return {name: TensorStats(arrays[f"{TENSOR_PREFIX}{name}.error"], arrays.get(f"{TENSOR_PREFIX}{name}.importance"),
                              functools.partial(read_hessian, path, name)
                              if path is not None and f"{HESSIAN_PREFIX}{name}" in stored else None)
            for name in names}


def read_hessian(path: Path, name: str) -> np.ndarray:
    """Tensor ``name``'s Hessian from the safetensors file at ``path`` (load_stats checked its shape and type)."""
    hessian = _read_array(path, f"{HESSIAN_PREFIX}{name}")
    if not np.isfinite(hessian).all():
        raise StatsFileError(f"{path}: the Hessian of {name} holds values that are not finite numbers")
    return hessian


def _read_array(path: Path, name: str) -> np.ndarray:
    """One array of the safetensors file at ``path``, read alone (those too large to load with the rest: the
    MoE inputs, the other tensors' Hessians)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return f.get_tensor(name)


def _normalised(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    total = values.sum()
    return values / total if total > 0 else np.full_like(values, 1.0 / len(values))


@dataclass
class CalibrationStats:
    info: dict                       # provenance: model, text, tokens, seed, ...
    types: list[str]                 # candidate types, the columns of every eps
    layers: list[LayerStats | None] = field(default_factory=list)  # None: a dense layer (no experts)
    path: Path | None = None         # the file they were read from or saved to (moe_input is read from it)
    tensor_types: list[str] = field(default_factory=list)   # the columns of every tensor error
    tensors: dict[str, TensorStats] = field(default_factory=dict)  # GGUF name -> the other weight matrices
    fisher: Fisher | None = None   # None: not measured (every error counts alike)

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
        """Do these statistics hold what the experts' Hessians are built from (calibrate --hessian)?"""
        return bool(self.moe_layers) and self.moe_layers[0][1].routed_ids is not None

    def moe_input(self, bid: int) -> np.ndarray:
        """[tokens, H] float32: layer ``bid``'s MoE input of every calibration token, read from the file."""
        if not self.has_hessian or self.path is None:
            raise StatsFileError("these statistics hold no MoE inputs: calibrate with --hessian")
        return _read_array(self.path, f"blk.{bid}.moe_input")

    def save(self, path: str | Path, moe_inputs: Callable[[int], np.ndarray] | None = None) -> Path:
        """Write the file; ``moe_inputs(bid)`` gives each MoE layer's inputs (--hessian), which are streamed
        into it one layer at a time."""
        arrays: dict[str, np.ndarray | Callable[[], np.ndarray]] = {**layer_arrays(self.layers),
                                                                    **tensor_arrays(self.tensors),
                                                                    **(self.fisher.arrays() if self.fisher is not None
                                                                       else {})}
        if moe_inputs is not None:
            for bid, _ in self.moe_layers:
                arrays[f"blk.{bid}.moe_input"] = functools.partial(moe_inputs, bid)
        with atomic_output(path) as tmp:
            write_safetensors(tmp, arrays, {METADATA_KEY: json.dumps(self.header())})
        self.path = Path(path)
        # the Hessians are read from this file from now on (a calibration's came from its work folder)
        self.tensors = {name: replace(t, hessian=functools.partial(read_hessian, self.path, name))
                        if t.hessian is not None else t for name, t in self.tensors.items()}
        return self.path

    def header(self) -> dict:
        tensor_types = {"tensor_types": self.tensor_types} if self.tensor_types else {}
        return {"format": FORMAT_VERSION, "types": self.types, **tensor_types, **self.info}

    def importance(self, name: str, n_per_row: int) -> np.ndarray | None:
        """The importance of GGUF tensor ``name``'s input columns, where the calibration measured one of
        ``n_per_row`` (its rows in the file are as long)."""
        stats = self.tensors.get(name)
        if stats is None or stats.importance is None or stats.importance.shape != (n_per_row,):
            return None
        return stats.importance


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
    optional = {"routed_ids", "routed_weights", "skip_cost", "drop_cost", "slot_experts", "skip_mean"}
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
            names = set(f.keys())
            # only LayerStats' arrays: the MoE inputs stay in the file until a layer's are asked for
            # (CalibrationStats.moe_input)
            known = {column.name for column in fields(LayerStats)}
            wanted = sorted(name for name in names if name.rpartition(".")[2] in known
                            or name.startswith((TENSOR_PREFIX, FISHER_PREFIX)))
            for name in wanted:  # numpy reads no bfloat16 or float8: such an array is not one save() wrote
                if numpy_dtype(dtype := f.get_slice(name).get_dtype()) is None:
                    raise StatsFileError(f"{path}: {name} is stored as {dtype}, a type the statistics never have")
            arrays = {name: f.get_tensor(name) for name in wanted}
            inputs = {name: f.get_slice(name).get_shape() for name in names if name.endswith(".moe_input")}
            hessians = {name[len(HESSIAN_PREFIX):]: (f.get_slice(name).get_shape(), f.get_slice(name).get_dtype())
                        for name in names if name.startswith(HESSIAN_PREFIX)}
    except (SafetensorError, OSError, ValueError) as exc:
        raise StatsFileError(f"{path} is not a readable statistics file ({exc})") from None
    except RecursionError:
        raise StatsFileError(f"{path} is not a readable statistics file (its header is nested too deeply)") from None
    _check_header(path, header)
    types = header.pop("types")
    tensor_types = header.pop("tensor_types", [])
    header.pop("format")
    layers = read_layers(arrays, header["n_layer"], dense=header.get("dense_layers") or ())
    _check_arrays(path, layers, len(types), inputs)
    tensors = read_tensors(arrays, path, names)
    _check_tensors(path, tensors, len(tensor_types), hessians)
    return CalibrationStats(info=header, types=types, layers=layers, path=path, tensor_types=tensor_types,
                            tensors=tensors, fisher=_read_fisher(path, arrays, header["n_layer"]))


MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS


def _check_header(path: Path, header) -> None:
    """The header's values that the stages compute with: the format, candidate types ggml has, the layers and
    which are dense, the model's folder, counts (other values are provenance, shown as they are)."""
    from mc_gguf.ggml.types import quant_type

    if not isinstance(header, dict):
        raise StatsFileError(f"{path}: the statistics' header is {type(header).__name__}, not a JSON object")
    if header.get("format") != FORMAT_VERSION or isinstance(header.get("format"), bool):
        raise StatsFileError(f"{path} has statistics format {header.get('format')!r}; this mc-gguf reads "
                             f"{FORMAT_VERSION}")
    types = header.get("types")
    if not isinstance(types, list):  # empty: routing only (odp-calibrate's pass)
        raise StatsFileError(f"{path}: the header's types are {types!r}, not a list of candidate types")
    tensor_types = header.get("tensor_types", [])
    if not isinstance(tensor_types, list):
        raise StatsFileError(f"{path}: the header's tensor_types are {tensor_types!r}, not a list of types")
    for name in [*types, *tensor_types]:
        try:
            quant_type(name)
        except ValueError as exc:
            raise StatsFileError(f"{path}: the header's types: {exc}") from None
    n_layer = header.get("n_layer")
    if not _whole(n_layer) or not 1 <= n_layer <= MAX_LAYERS:
        raise StatsFileError(f"{path}: the header's n_layer is {n_layer!r}; it must be 1 to {MAX_LAYERS}")
    dense = header.get("dense_layers")
    if dense is not None and not (isinstance(dense, list) and all(_whole(bid) and bid < n_layer for bid in dense)):
        raise StatsFileError(f"{path}: the header's dense_layers is {dense!r}, not a list of layers below {n_layer}")
    if not isinstance(header.get("model"), str) or not header["model"]:
        raise StatsFileError(f"{path}: the header's model is {header.get('model')!r}, not the model's folder")
    for key, least in (("n_expert_used", 1), ("n_tokens", 0)):
        value = header.get(key)
        if value is not None and not (_whole(value) and least <= value < 2 ** 32):
            raise StatsFileError(f"{path}: the header's {key} is {value!r}; it must be a whole number from {least}")


def _check_tensors(path: Path, tensors: dict[str, TensorStats], n_types: int,
                   hessians: dict[str, tuple[list[int], str]]) -> None:
    """Every tensor's error a row of the header's tensor types, its importance a row; finite and at least 0; a
    Hessian ([shape], dtype: checked without reading it) float32 [n, n] for a tensor of n input columns."""
    for name, (shape, dtype) in hessians.items():
        importance = tensors[name].importance if name in tensors else None
        if importance is None or shape != [importance.size, importance.size] or dtype != "F32":
            raise StatsFileError(f"{path}: the Hessian of {name} is {dtype} {shape}, expected F32 "
                                 + (f"[{importance.size}, {importance.size}] (its importance's columns)"
                                    if importance is not None else "for a tensor with an importance"))
    for name, stats in tensors.items():
        for what, value, ndim in (("error", stats.error, 1), ("importance", stats.importance, 1)):
            if value is None:
                continue
            if value.ndim != ndim or what == "error" and value.shape[0] != n_types:
                raise StatsFileError(f"{path}: the {what} of {name} has shape {list(value.shape)}, expected "
                                     + (f"[{n_types}] (the header's tensor types)" if what == "error" else "[n]"))
            if value.dtype.kind != "f" or not np.isfinite(value).all() or value.size and value.min() < 0:
                raise StatsFileError(f"{path}: the {what} of {name} holds values that are not finite numbers "
                                     "at least 0")


def _read_fisher(path: Path, arrays: dict[str, np.ndarray], n_layer: int) -> Fisher | None:
    """The file's Fisher information (None where it has none): both arrays [n_layer], finite and above 0 (a change
    that costs nothing at some depth is no measurement: it would make every error there free)."""
    values = {key: arrays.get(f"{FISHER_PREFIX}{key}") for key in ("mid", "out")}
    if all(value is None for value in values.values()):
        return None
    for key, value in values.items():
        if value is None or value.shape != (n_layer,) or value.dtype.kind != "f":
            raise StatsFileError(f"{path}: {FISHER_PREFIX}{key} is "
                                 + ("missing" if value is None else f"{value.dtype} {list(value.shape)}")
                                 + f", expected float [{n_layer}] (one per layer)")
        if not np.isfinite(value).all() or not value.min() > 0:
            raise StatsFileError(f"{path}: {FISHER_PREFIX}{key} holds values that are not finite numbers above 0")
    return Fisher(values["mid"].astype(np.float64), values["out"].astype(np.float64))


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_arrays(path: Path, layers: list[LayerStats | None], n_types: int, inputs: dict[str, list[int]]) -> None:
    """Every MoE layer's arrays in the shapes the module docstring gives, alike in every layer (E experts, H hidden
    size, F intermediate size, T types; tokens and slots as the first layer has them), finite, the sums and errors
    at least 0 and the expert ids among the experts."""
    moe = [(il, layer) for il, layer in enumerate(layers) if layer is not None]
    if not moe:
        raise StatsFileError(f"{path}: no layer has experts")
    first = moe[0][1]
    for name, dims in (("count", "[E]"), ("imatrix_in", "[E, H]"), ("imatrix_mid", "[E, F]"),
                       ("top_ratio", "[tokens, k - 1]"), ("routed_ids", "[tokens, k]")):
        value = getattr(first, name)
        if value is not None and value.ndim != dims.count(",") + 1:
            raise StatsFileError(f"{path}: {name} of layer {moe[0][0]} has shape {list(value.shape)}, not {dims}")
    n_expert, (_, hidden), (_, ff) = first.count.shape[0], first.imatrix_in.shape, first.imatrix_mid.shape
    slots = first.top_ratio.shape[1]
    routed = first.routed_ids.shape if first.routed_ids is not None else None
    for il, layer in moe:
        n_tokens = layer.top_ratio.shape[0] if layer.top_ratio.ndim == 2 else -1
        shapes = {"count": (n_expert,), "weight_sum": (n_expert,), "eps": (3, n_expert, n_types),
                  "imatrix_in": (n_expert, hidden), "imatrix_mid": (n_expert, ff), "top_ratio": (n_tokens, slots),
                  "skip_cost": (n_tokens, slots), "drop_cost": (n_tokens, slots), "slot_experts": (n_tokens, slots),
                  "skip_mean": (n_expert, hidden), "routed_ids": routed, "routed_weights": routed}
        for name, shape in shapes.items():
            value = getattr(layer, name)
            if value is None:
                continue
            if shape is None:
                raise StatsFileError(f"{path}: layer {il} has {name}, layer {moe[0][0]} has no routing")
            if value.shape != shape:
                raise StatsFileError(f"{path}: {name} of layer {il} has shape {list(value.shape)}, expected "
                                     f"{list(shape)}")
            if value.dtype.kind not in "fiu" or value.dtype.kind == "f" and not np.isfinite(value).all():
                raise StatsFileError(f"{path}: {name} of layer {il} holds {value.dtype} values, not finite numbers")
            low, high = (0, n_expert - 1) if name in ("slot_experts", "routed_ids") else (0, None)
            if name not in ("top_ratio", "routed_weights", "skip_mean") and value.size and (
                    value.min() < low or high is not None and value.max() > high):
                raise StatsFileError(f"{path}: {name} of layer {il} holds values outside [{low}, {high or 'inf'}]")
        if routed is not None and (layer.routed_ids is None or layer.routed_weights is None):
            raise StatsFileError(f"{path}: layer {il} lacks routed_ids or routed_weights, layer {moe[0][0]} has them")
        if layer.routed_ids is not None and inputs.get(f"blk.{il}.moe_input") != [routed[0], hidden]:
            raise StatsFileError(f"{path}: layer {il} has its routing but not its MoE inputs "
                                 f"[{routed[0]}, {hidden}]")
