"""Split the stacked experts of a GGUF into per-expert groups holding the very same bytes.

Tests use it to check that the runtime's group mechanics compute exactly what
the stacked tensors compute (in every architecture the runtime loads groups
for), and bench_speed to measure what the groups alone cost in decoding (same
bytes, same types: any difference is the layout's). The file's metadata is
copied, mc.experts.groups added.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from mc_gguf.gguf_io import keys
from mc_gguf.gguf_io.edit import copy_metadata, field_value, open_gguf
from mc_gguf.gguf_io.layout import PROJECTIONS, group_name
from mc_gguf.gguf_io.write import OutputTensor, write_gguf


def regroup_experts(stock_path: str | Path, out_path: str | Path, partition: dict[int, list[int]],
                    down_partition: dict[int, list[int]] | None = None, progress: bool = False) -> Path:
    """Write ``stock_path``'s experts as groups: ``partition`` maps group -> its experts, the same
    in every layer, for gate and up, and for down unless ``down_partition`` is given."""
    reader = open_gguf(stock_path)
    arch = field_value(reader, "general.architecture")
    n_layer, n_expert = field_value(reader, f"{arch}.block_count"), field_value(reader, f"{arch}.expert_count")
    partitions = {"gate": partition, "up": partition, "down": down_partition or partition}
    for projection, groups in partitions.items():
        if sorted(x for members in groups.values() for x in members) != list(range(n_expert)):
            raise ValueError(f"the {projection} groups must hold every expert exactly once: {groups}")
    group_of = {projection: [next(g for g, members in groups.items() if x in members) for x in range(n_expert)]
                for projection, groups in partitions.items()}

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
        copy_metadata(reader, writer, {keys.EXPERT_GROUPS: keys.details(
            keys.EXPERT_GROUPS, [g for p in PROJECTIONS for g in group_of[p]] * n_layer)})

    return write_gguf(out_path, arch, add_metadata, tensors, progress=progress)
