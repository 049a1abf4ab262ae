"""Change a GGUF's metadata without touching its tensors (or, rewrite_tensors, with tensors added or left out).

A GGUF is a header (key-values and the tensor table) followed by the tensor
data at an aligned offset (gguf.cpp: gguf_get_data_offset). When the new
header pads to the same data offset and the tensor table keeps its offsets,
only the header is rewritten: the file is cloned (a reflink on copy-on-write
filesystems such as APFS, btrfs and XFS; else a kernel-side copy) and the
clone's header overwritten before it is renamed into place. Otherwise the
file is rewritten through gguf-py (gguf_new_metadata's streaming copy).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gguf
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

from mc_gguf.atomic import atomic_output
from mc_gguf.errors import GGUFFileError


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """A GGUFReader, or a clear error for a missing, truncated or corrupt file (its header checked first with
    every count bounded by the file: gguf-py would allocate or loop on whatever a corrupt header declares)."""
    from mc_gguf.gguf_io.header import scan

    path = Path(path)
    scan(path)
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
    header = _header_bytes(reader, updates, remove)
    with atomic_output(dst) as tmp:
        if header is not None:
            _clone(Path(src), tmp)
            with open(tmp, "r+b") as f:
                f.write(header)
        else:
            copy_with_new_metadata(reader, _writer(tmp, reader), dict(updates), list(remove))
    return Path(dst)


def rewrite_tensors(src: str | Path, dst: str | Path, updates: dict[str, MetadataDetails], *,
                    remove: Sequence[str] = (), drop: Callable[[str], object] = lambda name: False,
                    add: Sequence = ()) -> Path:
    """Copy ``src`` to ``dst`` (may be the same path) with keys set or removed, the tensors ``drop`` names left out
    and ``add`` (write.OutputTensor) appended; streamed, one tensor in memory at a time, written atomically."""
    from mc_gguf.gguf_io.write import OutputTensor, write_gguf

    reader = open_gguf(src)
    if reader.endianess != gguf.GGUFEndian.LITTLE:  # write_gguf writes little-endian files
        raise GGUFFileError(f"{src} is a big-endian GGUF; mc-gguf rewrites the tensors of little-endian files only")
    kept = [OutputTensor(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type,
                         lambda t=t: t.data) for t in reader.tensors if not drop(t.name)]

    def add_metadata(writer: gguf.GGUFWriter) -> None:
        writer.data_alignment = reader.alignment
        copy_metadata(reader, writer, updates, remove)

    return write_gguf(dst, field_value(reader, gguf.Keys.General.ARCHITECTURE), add_metadata, [*kept, *add],
                      progress=False)


def copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, updates: dict[str, MetadataDetails],
                  remove: Sequence[str] = ()) -> None:
    """Every key of ``reader`` but ``remove`` into ``writer``, ``updates`` set (the key-value loop of gguf-py's
    gguf_new_metadata.copy_with_new_metadata, for a writer whose tensors are new)."""
    updates = dict(updates)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF.") or field.name in remove:
            continue  # virtual fields, those GGUFWriter writes itself, and the removed
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = updates.pop(field.name, MetadataDetails(value_type, field.contents(), sub_type=sub_type))
        writer.add_key_value(field.name, value.value, value.type, sub_type=value.sub_type)
    for key, value in updates.items():
        writer.add_key_value(key, value.value, value.type, sub_type=value.sub_type)


def _writer(path: Path, reader: gguf.GGUFReader, cls: type[gguf.GGUFWriter] = gguf.GGUFWriter) -> gguf.GGUFWriter:
    """A writer of ``reader``'s architecture, byte order and alignment (the file's general.alignment or 32)."""
    writer = cls(path, arch=field_value(reader, gguf.Keys.General.ARCHITECTURE), endianess=reader.endianess)
    writer.data_alignment = reader.alignment
    return writer


class _HeaderOnlyWriter(gguf.GGUFWriter):
    """gguf-py's writer, writing the header and tensor table but none of the tensor data."""

    def write_tensor_data(self, tensor, tensor_endianess=None) -> None:
        self.tensors[0].pop(next(iter(self.tensors[0])))


def _header_bytes(reader: gguf.GGUFReader, updates: dict[str, MetadataDetails], remove: Sequence[str]) -> bytes | None:
    """The new header padded to the old data offset, or None when it does not fit there or would move tensors."""
    import tempfile

    align = reader.alignment
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "header.gguf"
        copy_with_new_metadata(reader, _writer(path, reader, _HeaderOnlyWriter), dict(updates), list(remove))
        header = path.read_bytes()
    if gguf.GGUFWriter.ggml_pad(len(header), align) != reader.data_offset:
        return None
    offset = reader.data_offset  # GGUFWriter places each tensor at the next aligned offset
    for tensor in reader.tensors:
        if tensor.data_offset != offset:
            return None
        offset += gguf.GGUFWriter.ggml_pad(int(tensor.n_bytes), align)
    return header + bytes(reader.data_offset - len(header))


def _clone(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of ``src``: a reflink where the filesystem shares blocks, else a kernel copy."""
    import shutil

    try:
        import fcntl

        with open(src, "rb") as fin, open(dst, "wb") as fout:
            fcntl.ioctl(fout.fileno(), 0x40049409, fin.fileno())  # FICLONE (linux/fs.h)
        return
    except (ImportError, OSError):
        pass
    shutil.copyfile(src, dst)  # copy_file_range/sendfile on Linux, fcopyfile (a clone on APFS) on macOS
