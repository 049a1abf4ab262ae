"""Split the stacked experts of a GGUF into per-expert groups holding the very same bytes.

Tests use it to check that the runtime's group mechanics compute exactly what
the stacked tensors compute, and bench_speed to measure what the groups alone
cost in decoding (same bytes, same types: any difference is the layout's).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from mc_gguf.gguf_io import keys
from mc_gguf.gguf_io.convert import model_metadata
from mc_gguf.gguf_io.layout import PROJECTIONS, group_name
from mc_gguf.gguf_io.write import OutputTensor, write_gguf
from mc_gguf.hf.checkpoint import open_checkpoint


def regroup_experts(stock_path: str | Path, out_path: str | Path, model_dir: str | Path,
                    partition: dict[int, list[int]], down_partition: dict[int, list[int]] | None = None,
                    progress: bool = False) -> Path:
    """Write ``stock_path``'s experts as groups: ``partition`` maps group -> its experts, the same
    in every layer, for gate and up, and for down unless ``down_partition`` is given.

    The metadata is written afresh from the checkpoint in ``model_dir`` (the file's own
    mc.* keys are not carried over).
    """
    ckpt = open_checkpoint(model_dir)
    partitions = {"gate": partition, "up": partition, "down": down_partition or partition}
    for projection, groups in partitions.items():
        if sorted(x for members in groups.values() for x in members) != list(range(ckpt.n_experts)):
            raise ValueError(f"the {projection} groups must hold every expert exactly once: {groups}")
    group_of = {projection: [next(g for g, members in groups.items() if x in members) for x in range(ckpt.n_experts)]
                for projection, groups in partitions.items()}

    reader = gguf.GGUFReader(stock_path)
    tensors = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        data = np.asarray(t.data)
        parts = t.name.split(".")
        if not t.name.endswith("_exps.weight"):
            tensors.append(OutputTensor(t.name, shape, t.tensor_type, lambda data=data: data))
            continue
        bid, projection = int(parts[1]), parts[2][len("ffn_"):-len("_exps")]
        for g, members in sorted(partitions[projection].items()):
            tensors.append(OutputTensor(group_name(bid, projection, g), (len(members), *shape[1:]), t.tensor_type,
                                        lambda data=data, members=members: data[sorted(members)]))

    def add_metadata(writer: gguf.GGUFWriter) -> None:
        model_metadata(ckpt, gguf.LlamaFileType.GUESSED)(writer)
        writer.add_array(keys.EXPERT_GROUPS, [g for p in PROJECTIONS for g in group_of[p]] * ckpt.n_layers)

    return write_gguf(out_path, gguf.MODEL_ARCH_NAMES[ckpt.arch.gguf_arch], add_metadata, tensors, progress=progress)
