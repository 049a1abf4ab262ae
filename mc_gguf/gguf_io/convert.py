"""Convert a Hugging Face MoE checkpoint into a GGUF that llama.cpp runs.

Tensor names come from gguf-py's TensorNameMap; a layer's experts are stacked
into one 3-D tensor per projection (``blk.N.ffn_{gate,up,down}_exps``), which
is what llama.cpp's loader expects. Nothing is held in memory but the tensor
being written.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from mc_gguf.atomic import check_output_path
from mc_gguf.errors import CheckpointError
from mc_gguf.ggml.types import stored_type
from mc_gguf.gguf_io.metadata import add_general, add_hparams, add_sentencepiece_vocab
from mc_gguf.gguf_io.write import OutputTensor, stack_one_at_a_time, write_gguf
from mc_gguf.hf.checkpoint import Checkpoint, open_checkpoint

T = gguf.GGMLQuantizationType

OUTPUT_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (T.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (T.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (T.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (T.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# Tensors convert_hf_to_gguf.py keeps in F32 whatever the output type: norms
# (1-D) and the router, whose logits decide which experts run.
F32_ONLY = (gguf.MODEL_TENSOR.FFN_GATE_INP,)

# Buffers some checkpoints carry that are not weights.
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


def permute_rope_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder Q/K rows from rotate-half pairs to adjacent pairs.

    Same permutation as LlamaModel.permute in llama.cpp's convert_hf_to_gguf.py:
    HF checkpoints rotate (x_i, x_{i+d/2}); llama.cpp's "llama" rope rotates (x_2i, x_2i+1).
    """
    rows = weights.shape[0]
    return (
        weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


# Types gguf-py quantizes itself; K- and i-quants go through ggml's own quantizers.
GGUF_PY_TYPES = (T.F16, T.BF16, T.Q8_0)

# Chooses a tensor's type from its kind, GGUF name and shape.
TypeChooser = Callable[[gguf.MODEL_TENSOR, str, tuple[int, ...]], gguf.GGMLQuantizationType]


def encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """float32 -> the bytes of ``qtype``."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype == T.F32:
        return data
    if qtype in GGUF_PY_TYPES:
        return gguf.quants.quantize(data, qtype)
    from mc_gguf.ggml import quants

    return quants.quantize(data.reshape(-1, data.shape[-1]), qtype).reshape(
        *data.shape[:-1], -1)


def fit_type(tensor_kind: gguf.MODEL_TENSOR, shape: tuple[int, ...],
             wanted: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """``wanted``, unless the tensor must stay F32 (norms, router) or its rows are not whole blocks of it
    (then llama-quantize's fallback, types.stored_type)."""
    if len(shape) == 1 or tensor_kind in F32_ONLY:
        return T.F32
    block_size, _ = gguf.GGML_QUANT_SIZES[wanted]
    if shape[-1] % block_size:
        return stored_type(wanted.name, shape[-1]).qtype
    return wanted


def uniform_type(wanted: gguf.GGMLQuantizationType) -> TypeChooser:
    return lambda kind, _name, shape: fit_type(kind, shape, wanted)


def plan_tensors(ckpt: Checkpoint, type_for: TypeChooser) -> list[OutputTensor]:
    """Every GGUF tensor of the output, in llama.cpp's usual order, with how to produce it."""
    arch = ckpt.arch
    config = ckpt.config
    name_map = gguf.get_tensor_name_map(arch.gguf_arch, ckpt.n_layers)
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)

    expert_names = {
        arch.expert_tensor(bid, xid, proj): (bid, proj)
        for bid in range(ckpt.n_layers)
        for xid in range(ckpt.n_experts)
        for proj, _ in arch.expert_projections
    }
    missing = sorted(set(expert_names) - set(ckpt.tensors))
    if missing:
        raise CheckpointError(f"{ckpt.path}: expert tensor {missing[0]} is missing ({len(missing)} in all)")

    planned: dict[str, OutputTensor] = {}

    def add(hf_key: str, shape: tuple[int, ...], produce_f32: Callable[[], np.ndarray],
            experts: list[str] | None = None) -> None:
        """A tensor from ``produce_f32``, or the stack of the ``experts`` (encoded one at a time)."""
        found = name_map.get_type_and_name(hf_key, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise CheckpointError(f"{ckpt.path}: tensor {hf_key} has no GGUF name for {arch.hf_architecture}")
        kind, gguf_name = found  # the suffix (.weight/.bias) is carried over by TensorNameMap
        qtype = type_for(kind, gguf_name, shape)

        def produce() -> np.ndarray:
            if experts is None:
                return encode(produce_f32(), qtype)
            return stack_one_at_a_time(len(experts), lambda x: encode(ckpt.load(experts[x]), qtype))

        planned[gguf_name] = OutputTensor(gguf_name, shape, qtype, produce)

    for name in ckpt.tensors:
        if name in expert_names or IGNORED.match(name):
            continue
        shape = ckpt.shape(name)
        if arch.permute_qk and name.endswith("self_attn.q_proj.weight"):
            add(name, shape, lambda name=name: permute_rope_rows(ckpt.load(name), n_head))
        elif arch.permute_qk and name.endswith("self_attn.k_proj.weight"):
            add(name, shape, lambda name=name: permute_rope_rows(ckpt.load(name), n_head_kv))
        else:
            add(name, shape, lambda name=name: ckpt.load(name))
    if "lm_head.weight" not in ckpt.tensors and config.get("tie_word_embeddings"):
        add("lm_head.weight", ckpt.shape("model.embed_tokens.weight"), lambda: ckpt.load("model.embed_tokens.weight"))

    for bid in range(ckpt.n_layers):
        for proj, _ in arch.expert_projections:
            names = [arch.expert_tensor(bid, xid, proj) for xid in range(ckpt.n_experts)]
            shapes = {ckpt.shape(n) for n in names}
            if len(shapes) != 1:
                raise CheckpointError(f"{ckpt.path}: experts of layer {bid} ({proj}) have different shapes {sorted(shapes)}")
            shape = (ckpt.n_experts, *shapes.pop())
            add(arch.stacked_expert_name(bid, proj) + ".weight", shape, None, experts=names)

    return sorted(planned.values(), key=_gguf_order)


def _gguf_order(tensor: OutputTensor) -> tuple:
    """token_embd first, then blocks in order, then output_norm and output."""
    match = re.match(r"blk\.(\d+)\.", tensor.name)
    if match:
        return (1, int(match.group(1)), tensor.name)
    return (0 if tensor.name.startswith("token_embd") else 2, 0, tensor.name)


def convert(model_dir: str | Path, out_path: str | Path, out_type: str = "f16", *, progress: bool = True) -> Path:
    """HF folder -> GGUF at ``out_path`` (written atomically). ``out_type``: f32, f16, bf16 or q8_0."""
    if out_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output type {out_type!r}; choose one of {', '.join(OUTPUT_TYPES)}")
    check_output_path(out_path)
    ckpt = open_checkpoint(model_dir)
    qtype, file_type = OUTPUT_TYPES[out_type]
    tensors = plan_tensors(ckpt, uniform_type(qtype))
    return write_gguf(out_path, gguf.MODEL_ARCH_NAMES[ckpt.arch.gguf_arch], model_metadata(ckpt, file_type),
                      tensors, progress=progress)


def model_metadata(ckpt: Checkpoint, file_type: gguf.LlamaFileType) -> Callable[[gguf.GGUFWriter], None]:
    """What every GGUF of this checkpoint carries: general info, hyperparameters, vocabulary."""
    def add_metadata(writer: gguf.GGUFWriter) -> None:
        add_general(writer, ckpt, file_type)
        add_hparams(writer, ckpt)
        add_sentencepiece_vocab(writer, ckpt.path, int(ckpt.config["vocab_size"]))

    return add_metadata
