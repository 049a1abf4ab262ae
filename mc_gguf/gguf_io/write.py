"""Stream tensors into a GGUF file with gguf-py's GGUFWriter, one tensor in memory at a time.

The header and tensor table are written first from shapes and types alone;
then every tensor is produced (read, transformed, quantized) just before its
bytes are written, so peak memory is the largest single tensor, not the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from mc_gguf.atomic import atomic_output, check_free_space


@dataclass
class OutputTensor:
    """One GGUF tensor: its name, logical shape (numpy order), type, and how to make its bytes."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.qtype)


def stack_one_at_a_time(count: int, produce: Callable[[int], np.ndarray]) -> np.ndarray:
    """``np.stack([produce(i) for i in range(count)])``, holding one part at a time besides the result
    (a layer's experts become one 3-D tensor without a list of them in memory)."""
    first = produce(0)
    out = np.empty((count, *first.shape), dtype=first.dtype)
    out[0] = first
    del first
    for i in range(1, count):
        out[i] = produce(i)
    return out


def tensor_nbytes(shape: Sequence[int], qtype: gguf.GGMLQuantizationType) -> int:
    """Bytes ggml stores for a tensor of this shape and type (rows are whole blocks)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_per_row = shape[-1]
    if n_per_row % block_size:
        raise ValueError(f"row length {n_per_row} is not a multiple of {qtype.name}'s block size {block_size}")
    return int(np.prod(shape[:-1], dtype=np.int64)) * (n_per_row // block_size) * type_size


def _start_writer(path: Path, arch_name: str, add_metadata: Callable[[gguf.GGUFWriter], None],
                  tensors: Sequence[OutputTensor]) -> gguf.GGUFWriter:
    """A writer that has written the header, metadata and tensor table to ``path``."""
    writer = gguf.GGUFWriter(path, arch_name)
    add_metadata(writer)
    for tensor in tensors:
        # The dtype argument only matters for byte-shaped uint8 input; the
        # logical shape and raw_dtype describe the tensor fully.
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes, raw_dtype=tensor.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    return writer


def predict_file_bytes(arch_name: str, add_metadata: Callable[[gguf.GGUFWriter], None],
                       tensors: Sequence[OutputTensor]) -> int:
    """The exact size of the file write_gguf would write: its header is written to a scratch
    file and measured, and every tensor's data is padded to the alignment as GGUFWriter pads it."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        writer = _start_writer(Path(scratch) / "header.gguf", arch_name, add_metadata, tensors)
        writer.close()
        header = (Path(scratch) / "header.gguf").stat().st_size
    align = writer.data_alignment
    return gguf.GGUFWriter.ggml_pad(header, align) + sum(gguf.GGUFWriter.ggml_pad(t.nbytes, align) for t in tensors)


def write_gguf(
    path: str | Path,
    arch_name: str,
    add_metadata: Callable[[gguf.GGUFWriter], None],
    tensors: Sequence[OutputTensor],
    *,
    progress: bool = True,
) -> Path:
    """Write ``tensors`` and metadata to ``path`` atomically; return the path."""
    with atomic_output(path) as tmp:
        writer = _start_writer(tmp, arch_name, add_metadata, tensors)
        total = sum(t.nbytes for t in tensors)
        # before the first tensor is made (quantize's hours): a disk that cannot hold the file is said now
        check_free_space(tmp.parent, total, f"writing {path}")
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {Path(path).name}",
                  disable=not progress, dynamic_ncols=True) as bar:
            for tensor in tensors:
                bar.set_postfix_str(tensor.name, refresh=False)
                data = tensor.produce()
                if data.nbytes != tensor.nbytes:
                    raise AssertionError(f"{tensor.name}: produced {data.nbytes} bytes, planned {tensor.nbytes}")
                writer.write_tensor_data(data)
                bar.update(tensor.nbytes)
        writer.close()
    return Path(path)
