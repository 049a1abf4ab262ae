"""GGUF metadata from a Hugging Face folder: hyper-parameters, tokenizer, general.* keys."""

from __future__ import annotations

import logging
from pathlib import Path

import gguf

from mc_gguf import __version__
from mc_gguf.errors import CheckpointError, UnsupportedArchitectureError
from mc_gguf.gguf_io import keys
from mc_gguf.hf.checkpoint import Checkpoint
from mc_gguf.hf.hub import model_name, named_folder

log = logging.getLogger(__name__)


def rope_theta(config: dict) -> float:
    """rope theta from either config layout (transformers < 5 top-level, >= 5 rope_parameters)."""
    params = config.get("rope_parameters") or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default" or config.get("rope_scaling"):
        raise UnsupportedArchitectureError(f"rope scaling {rope_type!r} is not supported yet")
    theta = params.get("rope_theta", config.get("rope_theta"))
    if theta is None:
        raise CheckpointError("config.json has no rope_theta")
    return float(theta)


def head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def add_hparams(writer: gguf.GGUFWriter, ckpt: Checkpoint) -> None:
    """The hyper-parameters llama.cpp's "llama" architecture reads for a Mixtral."""
    config = ckpt.config
    try:
        writer.add_context_length(int(config["max_position_embeddings"]))
        writer.add_embedding_length(int(config["hidden_size"]))
        writer.add_block_count(ckpt.n_layers)
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_head_count(int(config["num_attention_heads"]))
        writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
        writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
        writer.add_vocab_size(int(config["vocab_size"]))
    except KeyError as exc:
        raise CheckpointError(f"config.json has no {exc.args[0]}") from None
    dim = head_dim(config)
    writer.add_rope_dimension_count(dim)
    if dim != config["hidden_size"] // config["num_attention_heads"]:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_expert_count(ckpt.n_experts)
    writer.add_expert_used_count(ckpt.n_experts_used)
    window = config.get("sliding_window")
    if window and window < config["max_position_embeddings"]:
        # llama.cpp's "llama" graph has no sliding window (convert_hf_to_gguf.py drops it too).
        log.warning("sliding_window=%s is ignored: llama.cpp attends to the whole context", window)


def add_general(writer: gguf.GGUFWriter, ckpt: Checkpoint, file_type: gguf.LlamaFileType) -> None:
    """general.*: name, basename, size label, version, license, base models... as llama.cpp's converter finds
    them (gguf-py's Metadata: the folder's name, the model card, config.json; convert_hf_to_gguf.py's
    prepare_metadata), the folder named as the model (a Hub snapshot's is a commit hash)."""
    import math

    first = ckpt.moe_layers[0]
    per_expert = len(ckpt.moe_layers) * sum(math.prod(ckpt.expert_shape(first, p))
                                            for p, _ in ckpt.arch.expert_projections)
    total = sum(math.prod(entry.shape) for entry in ckpt.tensors.values())
    shared = total - ckpt.n_experts * per_expert
    with named_folder(ckpt.path) as folder:
        metadata = gguf.Metadata.load(None, folder, None, total)
    if metadata.name is None:
        metadata.name = model_name(ckpt.path)
    if metadata.size_label is None:
        metadata.size_label = gguf.size_label(total, shared, per_expert, ckpt.n_experts)
    metadata.set_gguf_meta_model(writer)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string(keys.VERSION, __version__)


def sentencepiece_pieces(model_dir: Path) -> tuple[list[bytes], list[float], list]:
    """The pieces, scores and token types of a Llama/Mistral-style tokenizer: from tokenizer.model, or from
    tokenizer.json alone (as transformers 5 saves such a tokenizer).

    gguf-py reads both (SentencePieceVocab, LlamaHfVocab: what convert_hf_to_gguf.py's
    _set_vocab_sentencepiece and _set_vocab_llama_hf use), but LlamaHfVocab gives every piece the
    score -1000, and llama.cpp's SentencePiece tokenizer (llm_tokenizer_spm) merges the adjacent pair
    whose piece scores highest: with equal scores it merges in the wrong order. tokenizer.json's BPE
    merges are ranked (transformers' LlamaConverter writes them in the order of the SentencePiece
    scores), so a merged piece's score is minus the rank of the first merge that makes it.
    """
    if (model_dir / "tokenizer.model").exists():
        source, make = model_dir / "tokenizer.model", gguf.vocab.SentencePieceVocab
    elif (model_dir / "tokenizer.json").exists():
        source, make = model_dir / "tokenizer.json", gguf.vocab.LlamaHfVocab
    else:
        raise CheckpointError(f"{model_dir}: no tokenizer.model or tokenizer.json")
    try:
        tokens, scores, types = (list(column) for column in zip(*make(model_dir).all_tokens()))
    except Exception as exc:  # sentencepiece and tokenizers raise plain RuntimeError/OSError/TypeError
        raise CheckpointError(f"{source}: cannot be read as a SentencePiece-style tokenizer ({exc})") from None
    if make is gguf.vocab.LlamaHfVocab:
        scores = _merge_rank_scores(model_dir / "tokenizer.json", tokens)
    return tokens, scores, types


def _merge_rank_scores(path: Path, tokens: list[bytes]) -> list[float]:
    """Minus the rank of the first BPE merge that makes each piece; pieces no merge makes (characters,
    bytes, special tokens) score below every merged piece."""
    import json

    merges = json.loads(path.read_text(encoding="utf-8"))["model"]["merges"]
    rank: dict[bytes, int] = {}
    for r, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault((left + right).encode(), r)
    return [-float(rank[t]) if t in rank else -float(len(merges) + i) for i, t in enumerate(tokens)]


def add_sentencepiece_vocab(writer: gguf.GGUFWriter, model_dir: Path, n_vocab: int) -> None:
    """SentencePiece tokens, scores and types plus special tokens and chat template.

    The vocabulary is padded to the model's vocab_size with unused pieces, as
    convert_hf_to_gguf.py does, so token_embd and the vocabulary agree.
    """
    tokens, scores, types = sentencepiece_pieces(model_dir)
    _mark_added_special_tokens(model_dir, tokens, types)
    if len(tokens) > n_vocab:
        raise CheckpointError(f"tokenizer has {len(tokens)} pieces but config.json vocab_size is {n_vocab}")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    # SpecialVocab warns about the pair template of tokenizer.json's post-processor,
    # which llama.cpp never uses; keep its errors, drop that noise.
    vocab_log = logging.getLogger("gguf.vocab")
    level = vocab_log.level
    vocab_log.setLevel(logging.ERROR)
    try:
        gguf.SpecialVocab(model_dir, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)
    finally:
        vocab_log.setLevel(level)


def _mark_added_special_tokens(model_dir: Path, tokens: list[bytes], types: list) -> None:
    """Tokens that tokenizer.json declares special become CONTROL (as convert_hf_to_gguf.py does)."""
    import json

    path = model_dir / "tokenizer.json"
    if not path.exists():
        return
    for added in json.loads(path.read_text(encoding="utf-8")).get("added_tokens", []):
        token_id = added.get("id")
        if added.get("special") and isinstance(token_id, int) and token_id < len(tokens):
            if tokens[token_id] != added["content"].encode():
                raise CheckpointError(
                    f"tokenizer.json gives id {token_id} to {added['content']!r}, tokenizer.model to {tokens[token_id]!r}"
                )
            types[token_id] = gguf.TokenType.CONTROL


def file_type_of(tensors) -> gguf.LlamaFileType:
    """general.file_type of a file: the llama.cpp file type named after the ggml type that holds most of the
    routed experts' bytes (MOSTLY_Q4_K_M for Q4_K, MOSTLY_IQ2_XS for IQ2_XS, ...; as llama-quantize names the
    file by its main type), GUESSED where no file type is named so. ``tensors``: gguf_io.write's OutputTensors."""
    from collections import Counter

    from mc_gguf.gguf_io.layout import is_expert_weight

    held = Counter()
    for tensor in tensors:
        if is_expert_weight(tensor.name):
            held[tensor.qtype.name] += tensor.nbytes
    if not held:
        return gguf.LlamaFileType.GUESSED
    name = held.most_common(1)[0][0]
    for candidate in (f"MOSTLY_{name}", f"MOSTLY_{name}_M", name):
        if candidate in gguf.LlamaFileType.__members__:
            return gguf.LlamaFileType[candidate]
    return gguf.LlamaFileType.GUESSED
