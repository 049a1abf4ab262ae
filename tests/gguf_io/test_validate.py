"""GGUFs that llama.cpp's loader would abort on, or that make readers allocate or loop, are refused first with
their reason (issue family: the loader aborts; inspect and friends). Every command runs in a child process, so
that an abort shows as a failed test, not a dead test run."""

from __future__ import annotations

import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.scripts.gguf_new_metadata import MetadataDetails

from mc_gguf.errors import GGUFFileError
from mc_gguf.gguf_io.edit import open_gguf, rewrite_metadata
from mc_gguf.gguf_io.header import scan
from mc_gguf.gguf_io.validate import check_model

T = gguf.GGUFValueType


def mc_gguf(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mc_gguf", *argv], capture_output=True, text=True, timeout=timeout,
                          check=False)


def assert_clean_refusal(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 1 (not a signal), one 'mc-gguf: error:' line holding every needle, no traceback, no 'bug'."""
    err = result.stderr
    assert result.returncode == 1, (result.returncode, err[-2000:])
    lines = [line for line in err.splitlines() if line.startswith("mc-gguf: error:")]
    assert len(lines) == 1, err[-2000:]
    assert all(n in lines[0] for n in needles), lines[0]
    assert "Traceback" not in err and "this is a bug" not in err and "Aborted" not in err, err[-2000:]
    return lines[0]


# --------------------------------------------------------- a GGUF written byte by byte, faults included

def _string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def raw_gguf(path: Path, kv: list[tuple[str, int, object]], tensors: list[tuple[str, list[int], int, int]],
             data: bytes = b"", alignment: int = 32, version: int = 3, n_tensors: int | None = None,
             n_kv: int | None = None) -> Path:
    """A GGUF as gguf.cpp reads it, with whatever counts, shapes, types and offsets the caller gives: ``kv``
    holds (key, type, value) (arrays: (key, (ARRAY, element type), list), or bytes already encoded);
    ``tensors`` (name, ne, ggml type, offset)."""
    out = bytearray(b"GGUF" + struct.pack("<I", version))
    out += struct.pack("<qq", len(tensors) if n_tensors is None else n_tensors, len(kv) if n_kv is None else n_kv)
    for key, value_type, value in kv:
        out += _string(key)
        if isinstance(value, bytes):
            out += struct.pack("<i", value_type if isinstance(value_type, int) else value_type[0]) + value
            continue
        if isinstance(value_type, tuple):
            out += struct.pack("<iiQ", T.ARRAY, value_type[1], len(value))
            out += b"".join(_scalar(value_type[1], v) for v in value)
        else:
            out += struct.pack("<i", value_type) + _scalar(value_type, value)
    for name, shape, ggml_type, offset in tensors:
        out += _string(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}q", *shape)
        out += struct.pack("<iQ", ggml_type, offset)
    out += bytes(-len(out) % alignment) + data
    path.write_bytes(bytes(out))
    return path


def _scalar(value_type: int, value) -> bytes:
    if value_type == T.STRING:
        return _string(value)
    fmt = {T.UINT8: "<B", T.INT8: "<b", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I", T.INT32: "<i",
           T.FLOAT32: "<f", T.BOOL: "<?", T.UINT64: "<Q", T.INT64: "<q", T.FLOAT64: "<d"}[value_type]
    return struct.pack(fmt, value)


def small_model_kv(arch: str = "llama") -> list:
    return [("general.architecture", T.STRING, arch), (f"{arch}.block_count", T.UINT32, 1),
            (f"{arch}.context_length", T.UINT32, 64), (f"{arch}.embedding_length", T.UINT32, 32)]


# --------------------------------------------------------------------------- the scan against gguf-py

def test_the_scan_reads_what_gguf_py_reads(converted):
    """Independent reference: gguf-py's reader on a real file (keys, their values, every tensor's place)."""
    path = converted("q8_0")
    header, reader = scan(path), gguf.GGUFReader(path)
    assert set(header.fields) == {name for name in reader.fields if not name.startswith("GGUF.")}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        ours, theirs = header.fields[name], field.contents()
        assert (list(ours) if isinstance(ours, np.ndarray) else ours) == pytest.approx(theirs) \
            if isinstance(theirs, (float, list)) and not isinstance(ours, list) else ours == theirs, name
    assert [(t.name, list(t.shape), t.type, header.data_offset + t.offset, t.nbytes) for t in header.tensors] == \
        [(t.name, [int(d) for d in t.shape], int(t.tensor_type), int(t.data_offset), int(t.n_bytes))
         for t in reader.tensors]


# ------------------------------------------------------------- structure: refused at once, whatever it declares

@pytest.mark.parametrize("case, needle", [
    ("array 2^40 long", "declares 1099511627776 elements"),
    ("string 2^29 long", "needs 536870912 bytes"),
    ("10^15 keys", "declares 1000000000000000 keys"),
    ("nested array", "array of arrays"),
    ("duplicate key", "appears twice"),
    ("5-D tensor", "5 dimensions"),
    ("zero-sized tensor", "every dimension must be at least 1"),
    ("overlapping tensors", "where llama.cpp expects"),
    ("tensor beyond the file", "truncated"),
    ("unknown ggml type", "not a type ggml reads"),
    ("rows not whole blocks", "not whole blocks of 32"),
    ("alignment not a power of two", "not a power of two"),
    ("version 1", "GGUF version 1"),
    ("a string that is not UTF-8", "general.name is not UTF-8 text"),
])
def test_corrupt_structure_is_refused_by_every_command_at_once(case, needle, tmp_path):
    kv, tensors, data = small_model_kv(), [("a.weight", [32, 2], 0, 0), ("b.weight", [32], 0, 256)], bytes(384)
    extra = {}
    if case == "array 2^40 long":
        kv.append(("tokenizer.ggml.tokens", T.ARRAY, struct.pack("<iQ", T.STRING, 1 << 40) + _string("a")))
    elif case == "string 2^29 long":
        kv.append(("general.name", T.STRING, struct.pack("<Q", 1 << 29) + b"abc"))
    elif case == "10^15 keys":
        extra["n_kv"] = 10 ** 15
    elif case == "nested array":
        kv.append(("x.nested", T.ARRAY, struct.pack("<iQ", T.ARRAY, 1) + struct.pack("<iQ", T.UINT8, 1) + b"\0"))
    elif case == "duplicate key":
        kv.append(kv[1])
    elif case == "5-D tensor":
        tensors[1] = ("b.weight", [32, 1, 1, 1, 1], 0, 256)
    elif case == "zero-sized tensor":
        tensors[1] = ("b.weight", [32, 0], 0, 256)
    elif case == "overlapping tensors":
        tensors[1] = ("b.weight", [32], 0, 0)
    elif case == "tensor beyond the file":
        data = bytes(300)
    elif case == "unknown ggml type":
        tensors[1] = ("b.weight", [32], 4, 256)  # Q4_2, removed from ggml
    elif case == "rows not whole blocks":
        tensors[1] = ("b.weight", [48], 8, 256)  # Q8_0 rows of 48
    elif case == "alignment not a power of two":
        kv.append(("general.alignment", T.UINT32, 48))
    elif case == "version 1":
        extra["version"] = 1
    elif case == "a string that is not UTF-8":  # the scan's error once held a view of its memory map (BufferError)
        kv.append(("general.name", T.STRING, _string(b"\x80\xff")))
    path = raw_gguf(tmp_path / "bad.gguf", kv, tensors, data, **extra)
    before = path.read_bytes()
    with pytest.raises(GGUFFileError, match=needle):
        scan(path)
    started = time.monotonic()
    for argv in (["inspect", str(path)], ["run", str(path), "-p", "hi", "-n", "1"]):
        assert_clean_refusal(mc_gguf(*argv), str(path), needle)
    assert time.monotonic() - started < 60
    assert path.read_bytes() == before


def test_open_gguf_scans_before_gguf_py_reads(tmp_path):
    path = raw_gguf(tmp_path / "huge.gguf", [("x", T.ARRAY, struct.pack("<iQ", T.UINT64, 1 << 40))], [])
    with pytest.raises(GGUFFileError, match="declares"):
        open_gguf(path)


# ----------------------------------------------------- hyper-parameters llama.cpp's loader would abort on

def _tokens(path: Path) -> list[str]:
    return list(scan(path).fields["tokenizer.ggml.tokens"])


@pytest.mark.parametrize("change, needle", [
    ({"llama.block_count": (T.UINT32, 0)}, "llama.block_count is 0"),
    ({"llama.block_count": (T.UINT32, 600)}, "llama.block_count is 600"),
    ({"llama.expert_count": (T.UINT32, 0)}, "no experts"),
    ({"llama.expert_count": (T.UINT32, 2000)}, "at most 1024 experts"),
    ({"llama.expert_group_count": (T.UINT32, 4)}, "expert_group_count is 4"),
    ({"llama.expert_group_count": (T.UINT32, 3)}, "must divide"),
    ({"llama.nextn_predict_layers": (T.UINT32, 5)}, "nextn_predict_layers is 5"),
    ({"llama.rope.scaling.type": (T.STRING, "bogus")}, "rope.scaling.type is 'bogus'"),
    ({"llama.attention.layer_norm_rms_epsilon": (T.FLOAT32, float("nan"))}, "layer_norm_rms_epsilon is nan"),
    ({"llama.attention.layer_norm_rms_epsilon": (T.FLOAT32, -1e-5)}, "at least 0"),
    ({"llama.expert_used_count": ((T.ARRAY, T.UINT32), [2, 2, 2])}, "3 values, one per layer is 2"),
    ({"tokenizer.ggml.bos_token_id": (T.UINT32, 40000)}, "not one of the 32000 tokens"),
    ({"tokenizer.ggml.tokens": "duplicate"}, "every token must be distinct"),
    ({"tokenizer.ggml.scores": ((T.ARRAY, T.FLOAT32), [0.0] * 10)}, "10 values for 32000 tokens"),
    ({"general.type": (T.STRING, "adapter")}, "LoRA adapter"),
    # found by tests/fuzz: llama.cpp loads these, then aborts when it tokenizes or computes
    ({"tokenizer.ggml.model": (T.STRING, "none")}, "tokenizer.ggml.model is 'none': the file has no vocabulary"),
    ({"tokenizer.ggml.model": (T.STRING, "bert")}, "a byte, which llama.cpp's WPM"),
    ({"tokenizer.ggml.tokens": "empty"}, "EMPTY_300]' 2 times"),
    ({"llama.attention.head_count_kv": ((T.ARRAY, T.UINT32), [2, 1])}, "head_count_kv differs between layers"),
    ({"llama.expert_used_count": ((T.ARRAY, T.UINT32), [2, 1])}, "expert_used_count differs between layers"),
])
def test_hyper_parameters_the_loader_asserts_on_are_refused_with_a_reason(change, needle, converted, tmp_path):
    source = converted("q8_0")
    updates = {}
    for key, value in change.items():
        if value in ("duplicate", "empty"):
            tokens = _tokens(source)
            # llama_vocab::load names an empty token "[EMPTY_<i>]": the same as token 301 here
            tokens[300], tokens[301] = ("", "[EMPTY_300]") if value == "empty" else (tokens[301], tokens[301])
            updates[key] = MetadataDetails(T.ARRAY, tokens, sub_type=T.STRING)
        elif isinstance(value[0], tuple):
            updates[key] = MetadataDetails(T.ARRAY, value[1], sub_type=value[0][1])
        else:
            updates[key] = MetadataDetails(value[0], value[1])
    bad = rewrite_metadata(source, tmp_path / "bad.gguf", updates)
    with pytest.raises(GGUFFileError, match=needle.replace("(", r"\(").replace("'", "'")):
        check_model(bad)
    assert_clean_refusal(mc_gguf("run", str(bad), "-p", "hi", "-n", "1"), needle)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    assert_clean_refusal(mc_gguf("eval", str(bad), "--text", str(text), "--ctx", "16"), needle)


def test_a_per_layer_expert_used_count_loads_as_llama_cpp_loads_it(converted, tmp_path):
    """llama.cpp reads expert_used_count as one number or one per layer (get_key_or_arr): both run, alike."""
    source = converted("q8_0")
    per_layer = rewrite_metadata(source, tmp_path / "per-layer.gguf",
                                 {"llama.expert_used_count": MetadataDetails(T.ARRAY, [2, 2], sub_type=T.UINT32)})
    check_model(per_layer)
    outputs = [mc_gguf("run", str(path), "-p", "The", "-n", "4", "--no-odp") for path in (source, per_layer)]
    assert [o.returncode for o in outputs] == [0, 0], outputs[1].stderr[-2000:]
    assert outputs[0].stdout == outputs[1].stdout
    assert mc_gguf("inspect", str(per_layer)).returncode == 0


def test_a_missing_tensor_is_named_with_llama_cpps_reason(converted, tmp_path):
    source = converted("q8_0")
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(tmp_path / "missing.gguf", "llama")
    from mc_gguf.gguf_io.edit import copy_metadata

    copy_metadata(reader, writer, {})
    for t in reader.tensors:
        if t.name != "blk.1.attn_v.weight":
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_clean_refusal(mc_gguf("run", str(tmp_path / "missing.gguf"), "-p", "hi", "-n", "1"),
                         "blk.1.attn_v.weight")


@pytest.mark.parametrize("name, dtype, needle", [
    ("blk.0.attn_norm.weight", np.float16, "blk.0.attn_norm.weight is of ggml type 1; norms and biases"),
    ("blk.0.attn_output.weight", np.float64, "blk.0.attn_output.weight is F64, a type ggml's CPU backend has no dot"),
    ("blk.1.attn_q.weight", np.int32, "blk.1.attn_q.weight is I32, a type ggml's CPU backend has no dot"),
])
def test_a_tensor_of_a_type_ggml_cannot_compute_with_is_refused(name, dtype, needle, converted, tmp_path):
    """llama.cpp loads these and dies at the first token (found by tests/fuzz): ggml's CPU mul takes an F32 operand
    with the F32 activations only (SIGABRT), and it has no dot product for F64 or integer weights (SIGSEGV)."""
    from mc_gguf.gguf_io.edit import copy_metadata

    reader = gguf.GGUFReader(converted("q8_0"))
    path = tmp_path / "bad.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    copy_metadata(reader, writer, {})
    for t in reader.tensors:
        if t.name == name:
            writer.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(dtype))
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFFileError, match=needle):
        check_model(path)
    assert_clean_refusal(mc_gguf("run", str(path), "-p", "hi", "-n", "1"), needle)


# ------------------------------------------------------------------------------ inspect and friends

def test_inspect_describes_adapters_projectors_and_unknown_architectures(tmp_path):
    lora = raw_gguf(tmp_path / "lora.gguf", [("general.architecture", T.STRING, "llama"),
                                             ("general.type", T.STRING, "adapter"),
                                             ("adapter.type", T.STRING, "lora"),
                                             ("adapter.lora.alpha", T.FLOAT32, 16.0)],
                    [("blk.0.attn_q.weight.lora_a", [32, 4], 0, 0)], bytes(512))
    mmproj = raw_gguf(tmp_path / "mmproj.gguf", [("general.architecture", T.STRING, "clip"),
                                                 ("general.type", T.STRING, "mmproj")],
                      [("v.patch_embd.weight", [32, 2], 0, 0)], bytes(256))
    unknown = raw_gguf(tmp_path / "unknown.gguf", small_model_kv("frobnicator"), [("a.weight", [32], 0, 0)],
                       bytes(128))
    for path, needle in ((lora, "LoRA adapter"), (mmproj, "multimodal projector"), (unknown, "frobnicator")):
        result = mc_gguf("inspect", str(path))
        assert result.returncode == 0 and needle in result.stdout, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    assert_clean_refusal(mc_gguf("run", str(lora), "-p", "hi"), "LoRA adapter", "not a model")


def test_inspect_refuses_a_corrupt_expert_group_map(converted, tmp_path):
    source = converted("q8_0")
    bad = rewrite_metadata(source, tmp_path / "bad-groups.gguf",
                           {"mc.experts.groups": MetadataDetails(T.ARRAY, [0] * 5, sub_type=T.INT32)})
    assert_clean_refusal(mc_gguf("inspect", str(bad)), "mc.experts.groups has 5 values")
