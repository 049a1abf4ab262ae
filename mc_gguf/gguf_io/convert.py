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
from gguf.scripts.gguf_new_metadata import MetadataDetails

from mc_gguf.atomic import check_output_path
from mc_gguf.errors import CheckpointError, GGUFFileError
from mc_gguf.ggml.types import stored_type
from mc_gguf.gguf_io.edit import copy_metadata, open_gguf
from mc_gguf.gguf_io.llama_convert import base_without_experts, llama_cpp_convert
from mc_gguf.gguf_io.metadata import add_general, add_hparams, add_sentencepiece_vocab
from mc_gguf.gguf_io.write import OutputTensor, stack_one_at_a_time, write_gguf
from mc_gguf.hf.architectures import Converter
from mc_gguf.hf.checkpoint import Checkpoint, open_checkpoint

T = gguf.GGMLQuantizationType

OUTPUT_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (T.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (T.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (T.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (T.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# Tensors convert_hf_to_gguf.py keeps in F32 whatever the output type (ModelBase.prepare_tensors):
# norms (1-D, or named *_norm) and the routers, whose logits decide which experts run.
F32_ONLY = (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP)

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

# A GGUF tensor's float32 data encoded to a type's bytes, by the tensor's name: ``plain_encoder`` (ggml's quantizer
# alone), or quantize's (quantize/tensors.py: with the importance matrix and GPTQ on the Hessian the calibration
# measured for the tensor).
Encoder = Callable[[str, np.ndarray, gguf.GGMLQuantizationType], np.ndarray]


def plain_encoder(name: str, data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    return encode(data, qtype)


def encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """float32 -> the bytes of ``qtype``; ``imatrix`` weighs the K- and i-quants' rounding (llama-quantize's)."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype == T.F32:
        return data
    if qtype in GGUF_PY_TYPES:
        return gguf.quants.quantize(data, qtype)
    from mc_gguf.ggml import quants

    return quants.quantize(data.reshape(-1, data.shape[-1]), qtype, imatrix).reshape(
        *data.shape[:-1], -1)


def fit_type(tensor_kind: gguf.MODEL_TENSOR, shape: tuple[int, ...],
             wanted: gguf.GGMLQuantizationType, name: str = "") -> gguf.GGMLQuantizationType:
    """``wanted``, unless the tensor must stay F32 (norms, router, biases: llama-quantize quantizes only
    ``weight`` tensors) or its rows are not whole blocks of it (then llama-quantize's fallback,
    types.stored_type)."""
    if len(shape) == 1 or tensor_kind in F32_ONLY or name.endswith(("_norm.weight", ".bias")):
        return T.F32
    block_size, _ = gguf.GGML_QUANT_SIZES[wanted]
    if shape[-1] % block_size:
        return stored_type(wanted.name, shape[-1]).qtype
    return wanted


def uniform_type(wanted: gguf.GGMLQuantizationType) -> TypeChooser:
    return lambda kind, name, shape: fit_type(kind, shape, wanted, name)


def plan_tensors(ckpt: Checkpoint, type_for: TypeChooser, encoder: Encoder = plain_encoder
                 ) -> list[OutputTensor]:
    """Every GGUF tensor of the output, in llama.cpp's usual order, with how to produce it: the routed
    experts stacked from the checkpoint one at a time, the rest from the row's converter (by ``encoder``)."""
    tensors = [*NON_EXPERT_TENSORS[ckpt.arch.converter](ckpt, type_for, encoder),
               *expert_tensors(ckpt, type_for)]
    return sorted(tensors, key=_gguf_order)


def expert_tensors(ckpt: Checkpoint, type_for: TypeChooser) -> list[OutputTensor]:
    """``blk.N.ffn_{gate,up,down}_exps``: each layer's experts stacked, each expert encoded alone."""
    arch = ckpt.arch
    name_map = gguf.get_tensor_name_map(arch.gguf_arch, ckpt.n_layers)
    tensors = []
    for bid in ckpt.moe_layers:
        for proj, _ in arch.expert_projections:
            shape = (ckpt.n_experts, *ckpt.expert_shape(bid, proj))
            kind, gguf_name = _gguf_name(ckpt, name_map, arch.stacked_expert_name(bid, proj) + ".weight")
            qtype = type_for(kind, gguf_name, shape)
            tensors.append(OutputTensor(gguf_name, shape, qtype, lambda bid=bid, proj=proj, qtype=qtype:
                                        stack_one_at_a_time(ckpt.n_experts, lambda x: encode(
                                            ckpt.expert_weight(bid, x, proj), qtype))))
    return tensors


def _gguf_name(ckpt: Checkpoint, name_map: gguf.TensorNameMap, hf_key: str) -> tuple[gguf.MODEL_TENSOR, str]:
    found = name_map.get_type_and_name(hf_key, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise CheckpointError(f"{ckpt.path}: tensor {hf_key} has no GGUF name for {ckpt.arch.hf_architecture}")
    return found  # the suffix (.weight/.bias) is carried over by TensorNameMap


def own_non_expert_tensors(ckpt: Checkpoint, type_for: TypeChooser, encoder: Encoder = plain_encoder
                           ) -> list[OutputTensor]:
    """mc-gguf's own conversion of every tensor but the routed experts (Mixtral: llama.cpp's "llama" arch)."""
    arch = ckpt.arch
    config = ckpt.config
    name_map = gguf.get_tensor_name_map(arch.gguf_arch, ckpt.n_layers)
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    routed = re.compile(arch.expert_pattern())
    tensors = []

    def add(hf_key: str, shape: tuple[int, ...], produce_f32: Callable[[], np.ndarray]) -> None:
        kind, gguf_name = _gguf_name(ckpt, name_map, hf_key)
        qtype = type_for(kind, gguf_name, shape)
        tensors.append(OutputTensor(gguf_name, shape, qtype, lambda: encoder(gguf_name, produce_f32(), qtype)))

    for name in ckpt.tensors:
        if routed.match(name) or IGNORED.match(name):
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
    return tensors


def llama_cpp_non_expert_tensors(ckpt: Checkpoint, type_for: TypeChooser, encoder: Encoder = plain_encoder
                                 ) -> list[OutputTensor]:
    """Every tensor of llama.cpp's conversion without the experts (llama_convert.base_without_experts),
    re-encoded to the type ``type_for`` gives it (its bytes as they are where that is the file's type)."""
    reader = open_gguf(base_without_experts(ckpt))
    kinds = _tensor_kinds(ckpt.arch.gguf_arch, ckpt.n_layers)
    tensors = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        kind = kinds.get(t.name.rsplit(".", 1)[0])
        if kind is None:
            raise GGUFFileError(f"llama.cpp's conversion of {ckpt.path} has a tensor {t.name} that gguf-py does not "
                                f"list for {gguf.MODEL_ARCH_NAMES[ckpt.arch.gguf_arch]}")
        qtype = type_for(kind, t.name, shape)
        if qtype == t.tensor_type:
            produce = lambda t=t: np.asarray(t.data)  # noqa: E731
        else:
            produce = lambda t=t, qtype=qtype: encoder(  # noqa: E731
                t.name, gguf.quants.dequantize(t.data, t.tensor_type), qtype)
        tensors.append(OutputTensor(t.name, shape, qtype, produce))
    return tensors


def _tensor_kinds(arch: gguf.MODEL_ARCH, n_layers: int) -> dict[str, gguf.MODEL_TENSOR]:
    """GGUF tensor name (without .weight/.bias) -> its MODEL_TENSOR, for every tensor gguf-py lists for ``arch``."""
    kinds = {}
    for kind in gguf.MODEL_TENSORS[arch]:
        template = gguf.TENSOR_NAMES[kind]
        for bid in (range(n_layers) if "{bid}" in template else (None,)):
            kinds[template.format(bid=bid)] = kind
    return kinds


# Who converts what mc-gguf does not decide itself, by the row's ``converter``.
NON_EXPERT_TENSORS: dict[Converter, Callable[[Checkpoint, TypeChooser, Encoder], list[OutputTensor]]] = {
    Converter.MC_GGUF: own_non_expert_tensors,
    Converter.LLAMA_CPP: llama_cpp_non_expert_tensors,
}


def _gguf_order(tensor: OutputTensor) -> tuple:
    """token_embd first, then blocks in order, then output_norm and output."""
    match = re.match(r"blk\.(\d+)\.", tensor.name)
    if match:
        return (1, int(match.group(1)), tensor.name)
    return (0 if tensor.name.startswith("token_embd") else 2, 0, tensor.name)


def convert(model_dir: str | Path, out_path: str | Path, out_type: str = "f16", *, progress: bool = True) -> Path:
    """HF folder -> GGUF at ``out_path`` (written atomically). ``out_type``: f32, f16, bf16 or q8_0.

    Families whose row names llama.cpp's converter are converted by it, whole."""
    if out_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output type {out_type!r}; choose one of {', '.join(OUTPUT_TYPES)}")
    check_output_path(out_path, inputs=[model_dir])
    ckpt = open_checkpoint(model_dir)
    if ckpt.arch.converter is Converter.LLAMA_CPP:
        return llama_cpp_convert(ckpt, out_path, out_type)
    qtype, file_type = OUTPUT_TYPES[out_type]
    tensors = plan_tensors(ckpt, uniform_type(qtype))
    return write_gguf(out_path, gguf.MODEL_ARCH_NAMES[ckpt.arch.gguf_arch], model_metadata(ckpt, file_type),
                      tensors, progress=progress)


def model_metadata(ckpt: Checkpoint, file_type: gguf.LlamaFileType) -> Callable[[gguf.GGUFWriter], None]:
    """What every GGUF of this checkpoint carries: general info, hyperparameters, vocabulary."""
    return MODEL_METADATA[ckpt.arch.converter](ckpt, file_type)


def own_metadata(ckpt: Checkpoint, file_type: gguf.LlamaFileType) -> Callable[[gguf.GGUFWriter], None]:
    def add_metadata(writer: gguf.GGUFWriter) -> None:
        add_general(writer, ckpt, file_type)
        add_hparams(writer, ckpt)
        add_sentencepiece_vocab(writer, ckpt.path, int(ckpt.config["vocab_size"]))

    return add_metadata


def llama_cpp_metadata(ckpt: Checkpoint, file_type: gguf.LlamaFileType) -> Callable[[gguf.GGUFWriter], None]:
    """llama.cpp's converter's keys (llama_convert.base_without_experts), with this file's type and the size
    label of the model with its experts ("8x17M")."""
    def add_metadata(writer: gguf.GGUFWriter) -> None:
        reader = open_gguf(base_without_experts(ckpt))
        updates = {gguf.Keys.General.FILE_TYPE: MetadataDetails(gguf.GGUFValueType.UINT32, int(file_type))}
        if gguf.Keys.General.SIZE_LABEL in reader.fields:
            updates[gguf.Keys.General.SIZE_LABEL] = MetadataDetails(gguf.GGUFValueType.STRING, size_label(ckpt, reader))
        copy_metadata(reader, writer, updates)

    return add_metadata


def size_label(ckpt: Checkpoint, base: gguf.GGUFReader) -> str:
    """general.size_label as the converter derives it (GGUFWriter.get_total_parameter_count, gguf.size_label):
    the base's weights are shared, one expert's weights of every layer are the expert part."""
    shared = sum(int(t.n_elements) for t in base.tensors)
    first = ckpt.moe_layers[0]
    per_expert = len(ckpt.moe_layers) * sum(int(np.prod(ckpt.expert_shape(first, p)))
                                            for p, _ in ckpt.arch.expert_projections)
    return gguf.size_label(shared + ckpt.n_experts * per_expert, shared, per_expert, ckpt.n_experts)


MODEL_METADATA: dict[Converter, Callable[[Checkpoint, gguf.LlamaFileType], Callable[[gguf.GGUFWriter], None]]] = {
    Converter.MC_GGUF: own_metadata,
    Converter.LLAMA_CPP: llama_cpp_metadata,
}
if not set(NON_EXPERT_TENSORS) == set(MODEL_METADATA) == set(Converter):
    raise ImportError("gguf_io/convert.py: every Converter needs its non-expert tensors and its metadata")
