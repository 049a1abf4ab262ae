"""Checkpoints are checked as safetensors' own reader checks them, and config.json against the tensors, before any
work: every fault is one clear line, found at once, and the model folder is left as it was."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mc_gguf.errors import CheckpointError
from mc_gguf.hf.checkpoint import open_checkpoint


@pytest.fixture()
def model_copy(tiny_model_dir, tmp_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    return copy


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def convert(model: Path, out: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mc_gguf", "convert", str(model), "-o", str(out), "-q"],
                          capture_output=True, text=True, timeout=timeout, check=False)


def assert_refused(model: Path, tmp_path: Path, *needles: str) -> None:
    """convert exits 1 with one line naming the fault, writes nothing, and changes nothing in the folder."""
    before = folder_digest(model)
    out = tmp_path / "out.gguf"
    result = convert(model, out)
    lines = [line for line in result.stderr.splitlines() if line.startswith("mc-gguf: error:")]
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert all(n in lines[0] for n in needles), lines[0]
    assert "Traceback" not in result.stderr and "this is a bug" not in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.gguf*"))
    assert folder_digest(model) == before


def edit_config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))  # NaN and Infinity as Python's json writes them


def shard_of(model: Path, tensor: str) -> Path:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    return model / index["weight_map"][tensor]


def rewrite_header(shard: Path, change) -> None:
    """Change a shard's JSON header in place, its data untouched (the header padded to its old length)."""
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    change(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= n
    shard.write_bytes(data[:8] + raw + b" " * (n - len(raw)) + data[8 + n:])


@pytest.mark.parametrize("changes, needles", [
    ({"hidden_size": 128}, ("hidden_size 128", "disagree", "model.embed_tokens.weight")),
    ({"vocab_size": 32001}, ("vocab_size 32001", "disagree")),
    ({"intermediate_size": 256}, ("intermediate_size 256", "disagree with the experts' [512, 256]")),
    ({"num_hidden_layers": 3}, ("layer 2's router", "missing")),
    ({"num_hidden_layers": 10 ** 10}, ("num_hidden_layers = 10000000000", "at most 512")),
    ({"num_local_experts": 10 ** 9}, ("num_local_experts = 1000000000", "at most 1024")),
    ({"num_local_experts": 8}, ("expert tensor", "missing")),
    ({"rms_norm_eps": float("nan")}, ("rms_norm_eps is nan", "finite")),
    ({"rope_theta": float("inf")}, ("rope_theta is inf",)),
    ({"rope_theta": -10000.0}, ("rope_theta is -10000.0", "positive")),
    ({"rms_norm_eps": 0}, ("rms_norm_eps is 0", "positive")),
    ({"num_key_value_heads": -2}, ("num_key_value_heads is -2",)),
    # found by tests/fuzz: values of another JSON type than the readers compute with
    ({"architectures": True}, ("architectures is True", "a list of names")),
    ({"architectures": [None]}, ("architectures is [None]",)),
    ({"architectures": [["MixtralForCausalLM"]]}, ("a list of names",)),
    ({"mlp_only_layers": True}, ("mlp_only_layers is True", "a list of layer indices")),
    ({"intermediate_size": None}, ("intermediate_size is missing",)),
    ({"sliding_window": [None]}, ("sliding_window is [None]", "must be a number")),
    ({"rms_norm_eps": {}}, ("rms_norm_eps is {}", "must be a number")),
    ({"max_position_embeddings": 2 ** 40}, ("max_position_embeddings is 1099511627776", "below 2^32")),
    ({"quantization_config": "fp8"}, ("quantization_config is 'fp8'", "a JSON object")),
    ({"rope_parameters": {"rope_theta": float("nan"), "rope_type": "default"}},
     ("rope_parameters.rope_theta is nan", "finite")),
])
def test_config_values_are_checked_against_the_tensors_and_their_ranges(changes, needles, model_copy, tmp_path):
    edit_config(model_copy, **changes)
    assert_refused(model_copy, tmp_path, *needles)


@pytest.mark.parametrize("name, text, needle", [
    ("config.json", "[]", "not a JSON object (it holds list)"),
    ("config.json", "null", "not a JSON object (it holds NoneType)"),
    ("config.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("model.safetensors.index.json", '{"weight_map": {"lm_head.weight": null}}', "names shard None"),
    ("model.safetensors.index.json", '"weight_map"', "not a JSON object (it holds str)"),
])
def test_a_json_file_of_another_shape_is_refused(name, text, needle, model_copy, tmp_path):
    """Found by tests/fuzz: each of these was a TypeError, AttributeError or RecursionError."""
    (model_copy / name).write_text(text)
    with pytest.raises(CheckpointError, match=re.escape(needle)):
        open_checkpoint(model_copy)
    assert_refused(model_copy, tmp_path, name, needle)


def test_an_integer_tensor_is_not_converted_as_a_weight(model_copy, tmp_path):
    from safetensors.torch import load_file, save_file

    name = "model.layers.0.self_attn.q_proj.weight"
    shard = shard_of(model_copy, name)
    tensors = load_file(shard)
    tensors[name] = tensors[name].to(dtype=__import__("torch").int8)
    save_file(tensors, shard, metadata={"format": "pt"})
    assert_refused(model_copy, tmp_path, name, "I8")


@pytest.mark.parametrize("fault, needle", [
    ("shape larger than its bytes", "its offsets give"),
    ("offsets into the next tensor", "starts at byte"),
    ("a hole before the end", "corrupt safetensors"),
    ("negative offset", "corrupt safetensors header"),
])
def test_a_header_whose_offsets_disagree_with_the_tensors_is_refused(fault, needle, model_copy, tmp_path):
    """safetensors' own reader refuses these files; reading them as they say would fill a tensor with its
    neighbour's bytes."""
    name = "model.layers.0.self_attn.q_proj.weight"
    shard = shard_of(model_copy, name)

    def change(header):
        entry = header[name]
        begin, end = entry["data_offsets"]
        if fault == "shape larger than its bytes":
            entry["shape"] = [entry["shape"][0] * 2, entry["shape"][1]]
        elif fault == "offsets into the next tensor":
            entry["data_offsets"] = [begin + 4, end + 4]
        elif fault == "a hole before the end":
            entry["data_offsets"] = [begin, end - 4 * entry["shape"][0]]
            entry["shape"] = [entry["shape"][0], entry["shape"][1] - 1]
        else:
            entry["data_offsets"] = [-2, end]

    rewrite_header(shard, change)
    with pytest.raises(CheckpointError, match=needle):
        open_checkpoint(model_copy)
    assert_refused(model_copy, tmp_path, shard.name, needle)


@pytest.mark.parametrize("shard_name", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_the_index_cannot_name_files_outside_the_model_folder(shard_name, model_copy, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(sorted(model_copy.glob("model-*.safetensors"))[0], outside)
    index = json.loads((model_copy / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard_name
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_refused(model_copy, tmp_path, "weight_map", repr(shard_name))


def test_a_fifo_shard_is_refused_without_waiting(model_copy, tmp_path):
    shard = sorted(model_copy.glob("model-*.safetensors"))[0]
    shard.unlink()
    os.mkfifo(shard)
    out = tmp_path / "out.gguf"
    result = convert(model_copy, out, timeout=60)  # a read of the FIFO would block: the timeout fails the test
    assert result.returncode == 1 and "not a regular file" in result.stderr and shard.name in result.stderr


def test_the_shards_of_a_hugging_face_cache_snapshot_are_links_and_are_read(model_copy, tmp_path):
    """A snapshot folder holds links to ../../blobs: where a shard's link leads is not refused."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in sorted(model_copy.glob("model-*.safetensors")):
        target = blobs / hashlib.sha256(shard.name.encode()).hexdigest()
        shard.rename(target)
        shard.symlink_to(os.path.relpath(target, model_copy))
    ckpt = open_checkpoint(model_copy)
    assert ckpt.load("model.embed_tokens.weight").shape == (32000, 256)
