"""The file a plan describes: every tensor with its type (expert groups split by the layout), and its exact size.

``quantize`` writes this tensor list with the bytes filled in; ``allocate``
uses it without them to predict the file's size in bytes, header included,
before anything is quantized.
"""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np

from mc_gguf.allocate.plan import NON_EXPERT_DEFAULTS, Plan, non_expert_class
from mc_gguf.ggml.types import quant_type
from mc_gguf.gguf_io.convert import Encoder, fit_type, model_metadata, plain_encoder, plan_tensors
from mc_gguf.gguf_io.metadata import file_type_of
from mc_gguf.gguf_io.layout import ExpertGroup, expert_groups, is_expert_weight, tensor_names
from mc_gguf.gguf_io.write import OutputTensor, predict_file_bytes
from mc_gguf.hf.checkpoint import Checkpoint

T = gguf.GGMLQuantizationType
EXPERT_KINDS = {gguf.MODEL_TENSOR.FFN_GATE_EXP: "gate", gguf.MODEL_TENSOR.FFN_UP_EXP: "up",
                gguf.MODEL_TENSOR.FFN_DOWN_EXP: "down"}



def plan_type_chooser(plan: Plan):
    """convert.TypeChooser for a plan: the stacked expert tensors get their layer's single type
    (stock layout), every other tensor the type the plan gives it by name, or else its class's."""
    def type_for(kind: gguf.MODEL_TENSOR, name: str, shape: tuple[int, ...]) -> gguf.GGMLQuantizationType:
        if kind in EXPERT_KINDS and is_expert_weight(name):
            bid = int(name.split(".")[1])
            types = set(plan.projection_types(bid, EXPERT_KINDS[kind]))
            return quant_type(types.pop()).qtype if len(types) == 1 else T.F32
        wanted = plan.tensors.get(name) or plan.non_expert.get(non_expert_class(name),
                                                               NON_EXPERT_DEFAULTS[non_expert_class(name)])
        return fit_type(kind, shape, T[wanted.upper()], name)
    return type_for


# Produces the bytes of one expert group: (layer, projection, group) -> uint8 [n_experts, rows, row_bytes].
GroupProducer = Callable[[int, str, ExpertGroup], np.ndarray]


def layout_tensors(ckpt: Checkpoint, plan: Plan, produce_group: GroupProducer | None = None,
                   encoder: Encoder = plain_encoder) -> list[OutputTensor]:
    """Every tensor of the file the plan describes, expert groups split as gguf_io/layout.py names them.

    Without ``produce_group`` the expert tensors are described only (their
    ``produce`` raises); quantize supplies it, and the other tensors' ``encoder``.
    """
    def no_data() -> np.ndarray:
        raise AssertionError("this tensor list only describes the expert tensors")

    tensors = []
    for tensor in plan_tensors(ckpt, plan_type_chooser(plan), encoder):
        parts = tensor.name.split(".")
        projection = parts[2][len("ffn_"):-len("_exps")] if len(parts) == 4 and is_expert_weight(tensor.name) else None
        if projection is None:
            tensors.append(tensor)
            continue
        bid = int(parts[1])
        groups = expert_groups(plan.projection_types(bid, projection))
        for group, name in zip(groups, tensor_names(bid, projection, groups)):
            shape = (len(group.experts), *tensor.shape[1:])
            produce = no_data if produce_group is None else (
                lambda bid=bid, projection=projection, group=group: produce_group(bid, projection, group))
            tensors.append(OutputTensor(name, shape, quant_type(group.type_name).qtype, produce))
    return tensors


# What quantize adds to the header beyond the model's own keys, at most, per (layer, projection, expert): its type
# in mc.plan.types (a string: u64 length and up to 7 characters), its group in mc.experts.groups, a per-expert
# pruning threshold (4 bytes each), and the rest of the mc.* keys (the calibration's names and a few numbers).
KEY_BYTES_PER_EXPERT_ENTRY = 32
KEY_BYTES_REST = 8192


def metadata_allowance(ckpt: Checkpoint) -> int:
    """Bytes the mc.* keys (quantize.add_plan_metadata, the pruning thresholds) add to the header at most: what a
    file-size budget keeps free beyond ``predict``'s file, which has the model's keys only."""
    return KEY_BYTES_REST + KEY_BYTES_PER_EXPERT_ENTRY * ckpt.n_layers * len(EXPERT_KINDS) * ckpt.n_experts


def tensor_totals(tensors: list[OutputTensor]) -> dict:
    """Bytes, weights and bits per weight of a tensor list, experts and all."""
    expert = [t for t in tensors if is_expert_weight(t.name)]
    n_expert = sum(int(np.prod(t.shape)) for t in expert)
    n_all = sum(int(np.prod(t.shape)) for t in tensors)
    expert_bytes = sum(t.nbytes for t in expert)
    tensor_bytes = sum(t.nbytes for t in tensors)
    return {
        "expert_bpw": 8 * expert_bytes / n_expert,
        "model_bpw": 8 * tensor_bytes / n_all,
        "expert_bytes": expert_bytes,
        "tensor_bytes": tensor_bytes,
        "n_expert_weights": n_expert,
        "n_weights": n_all,
    }


def predict(ckpt: Checkpoint, plan: Plan) -> dict:
    """Bytes and bits per weight of the file the plan describes (header included, counted exactly)."""
    tensors = layout_tensors(ckpt, plan)
    file_bytes = predict_file_bytes(gguf.MODEL_ARCH_NAMES[ckpt.arch.gguf_arch],
                                    model_metadata(ckpt, file_type_of(tensors)), tensors)
    return {**tensor_totals(tensors), "file_bytes": file_bytes,
            "layer_expert_bpw": [float(bits.mean()) if plan.experts[bid] else None
                                 for bid, bits in enumerate(plan.expert_bits())]}

