"""The header of a GGUF as ggml's gguf.cpp reads it: its keys with their values, its tensor table, and where
the tensors' data begins.

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
What llama.cpp's loader asserts on beyond the header is validate.py's.
"""

from __future__ import annotations

import math
import mmap
import struct
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

# gguf.h's enum gguf_type: the numpy dtype of each scalar type (8: string, 9: array)
STRING, ARRAY = 8, 9
SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
           12: "<f8"}
BOOL = 7


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
