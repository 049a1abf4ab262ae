"""Change a GGUF's metadata without touching its tensors (a streaming copy through gguf-py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gguf
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

from mc_gguf.atomic import atomic_output
from mc_gguf.errors import GGUFFileError


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """A GGUFReader, or a clear error for a missing, truncated or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise GGUFFileError(f"{path}: no such file")
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises ValueError/struct.error/IndexError on bad bytes
        raise GGUFFileError(f"{path}: not a readable GGUF file ({exc})") from None


def field_value(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    return field.contents() if field is not None else None


def float_array(values: Sequence[float]) -> MetadataDetails:
    return MetadataDetails(gguf.GGUFValueType.ARRAY, [float(v) for v in values], sub_type=gguf.GGUFValueType.FLOAT32)


def float_value(value: float) -> MetadataDetails:
    return MetadataDetails(gguf.GGUFValueType.FLOAT32, float(value))


def rewrite_metadata(src: str | Path, dst: str | Path, updates: dict[str, MetadataDetails],
                     remove: Sequence[str] = ()) -> Path:
    """Copy ``src`` to ``dst`` (may be the same path) with keys set or removed; written atomically."""
    reader = open_gguf(src)
    arch = field_value(reader, gguf.Keys.General.ARCHITECTURE)
    with atomic_output(dst) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
        alignment = field_value(reader, gguf.Keys.General.ALIGNMENT)
        if alignment is not None:
            writer.data_alignment = alignment
        copy_with_new_metadata(reader, writer, dict(updates), list(remove))
    return Path(dst)
