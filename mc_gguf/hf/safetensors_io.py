"""safetensors files: the format's dtypes, a header read and checked as safetensors' own reader checks it, a
tensor's bytes read into a tensor of its own, and the writer the calibration statistics use.

The format (safetensors' README): a little-endian u64 header length, the JSON header with each tensor's dtype,
shape and byte range in the data (and an optional ``__metadata__`` of strings), then the data.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mc_gguf.errors import CheckpointError


@dataclass(frozen=True)
class Dtype:
    """A safetensors dtype: its bits per value (the Rust crate's Dtype::bitsize), and the numpy dtype the
    statistics file writes and reads it as and the torch dtype Checkpoint.load_torch reads its bytes into (None:
    safetensors' own reader reads it, or nothing does)."""
    bits: int
    numpy: type | None = None
    torch: str | None = None


# the dtypes of the safetensors format, by their names in a header
SAFETENSORS_DTYPES: dict[str, Dtype] = {
    "BOOL": Dtype(8, np.bool_, "bool"), "U8": Dtype(8, np.uint8, "uint8"), "I8": Dtype(8, np.int8, "int8"),
    "I16": Dtype(16, np.int16, "int16"), "U16": Dtype(16), "I32": Dtype(32, np.int32, "int32"), "U32": Dtype(32),
    "I64": Dtype(64, np.int64, "int64"), "U64": Dtype(64), "F16": Dtype(16, np.float16, "float16"),
    "BF16": Dtype(16, None, "bfloat16"), "F32": Dtype(32, np.float32, "float32"),
    "F64": Dtype(64, np.float64, "float64"), "F8_E4M3": Dtype(8), "F8_E5M2": Dtype(8), "F8_E8M0": Dtype(8),
    "F4": Dtype(4), "F6_E2M3": Dtype(6), "F6_E3M2": Dtype(6), "C64": Dtype(64),
}
# safetensors' own limit on a header (MAX_HEADER_SIZE)
MAX_HEADER_SIZE = 100_000_000


def numpy_dtype(name: str) -> type | None:
    """The numpy dtype of a safetensors dtype name as the statistics file holds it, None for any other name."""
    dtype = SAFETENSORS_DTYPES.get(name)
    return dtype.numpy if dtype is not None else None


@dataclass
class TensorEntry:
    shard: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0   # of its first byte in the shard file
    nbytes: int = 0


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
    bits = math.prod(shape) * SAFETENSORS_DTYPES[dtype].bits
    begin, end = offsets
    if bits % 8 or bits // 8 != end - begin:
        raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name} of shape {shape} in {dtype} "
                              f"takes {bits / 8:g} bytes, its offsets give {end - begin}")
    return TensorEntry(shard=path, dtype=dtype, shape=tuple(shape), offset=data_start + begin, nbytes=end - begin)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_tensor(entry: TensorEntry, index: int | None = None):
    """A tensor (or, with ``index``, its row ``index`` of the first dimension) as a torch tensor of its own dtype,
    its bytes read into it (safetensors' little-endian layout); None where torch does not read the dtype plainly
    (or the machine is big-endian), for safetensors' own reader to read it.

    safetensors' own reader maps the whole shard and keeps it mapped, so every
    tensor read stays in the process's resident memory until the end (5 GB
    shards, the whole model for a converter): this one reads only the bytes.
    """
    import torch

    dtype = getattr(torch, SAFETENSORS_DTYPES[entry.dtype].torch or "", None)
    if dtype is None or sys.byteorder != "little":
        return None
    shape, offset = entry.shape, entry.offset
    if index is not None:
        shape = entry.shape[1:]
        offset += index * (entry.nbytes // entry.shape[0])
    out = torch.empty(shape, dtype=dtype)
    read_into(entry.shard, offset, out.view(-1).view(torch.uint8).numpy())
    return out


def read_into(path: Path, offset: int, out: np.ndarray) -> None:
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


def write_safetensors(path: Path, arrays: dict[str, np.ndarray | Callable[[], np.ndarray]],
                      metadata: dict[str, str], chunk_bytes: int = 64 << 20) -> None:
    """A safetensors file of ``arrays`` (safetensors' own reader reads it), where a callable (giving a memory
    map, say) is called when its shape is needed and again when its bytes are written, so that no more than
    one of them is open at a time. The JSON header is padded with spaces to a multiple of 8 bytes."""
    names = {np.dtype(t.numpy): name for name, t in SAFETENSORS_DTYPES.items() if t.numpy is not None}

    def opened(value) -> np.ndarray:
        return value() if callable(value) else value

    header: dict[str, dict] = {"__metadata__": metadata}
    offset = 0
    for name, value in arrays.items():
        array = opened(value)
        if array.dtype not in names:
            raise ValueError(f"{name}: safetensors has no dtype for {array.dtype}")
        header[name] = {"dtype": names[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        del array
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for value in arrays.values():
            array = opened(value)
            flat = array.reshape(-1) if array.flags.c_contiguous else np.ascontiguousarray(array).reshape(-1)
            step = max(1, chunk_bytes // max(flat.itemsize, 1))
            for first in range(0, flat.size, step):
                f.write(np.ascontiguousarray(flat[first:first + step]).tobytes())
            del array, flat
