"""Bad input ends in a clear one-line error, a non-zero exit, and no output file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mc_gguf.cli import main


def run_convert(capsys, model_dir: Path, out: Path) -> str:
    code = main(["convert", str(model_dir), "-o", str(out), "--type", "f16", "-q"])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("mc-gguf: error: ") and "\n" not in err, err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "a temporary file was left behind"
    return err


@pytest.fixture()
def model_copy(tiny_model_dir, tmp_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    return copy


def test_folder_without_config(capsys, model_copy, tmp_path):
    (model_copy / "config.json").unlink()
    assert "no config.json" in run_convert(capsys, model_copy, tmp_path / "out.gguf")


def test_unsupported_architecture(capsys, model_copy, tmp_path):
    config = json.loads((model_copy / "config.json").read_text())
    config["architectures"] = ["DeepseekV3ForCausalLM"]
    (model_copy / "config.json").write_text(json.dumps(config))
    err = run_convert(capsys, model_copy, tmp_path / "out.gguf")
    assert "unsupported architecture DeepseekV3ForCausalLM" in err and "GptOssForCausalLM, MixtralForCausalLM" in err


def test_truncated_shard(capsys, model_copy, tmp_path):
    shard = sorted(model_copy.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    err = run_convert(capsys, model_copy, tmp_path / "out.gguf")
    assert shard.name in err and "truncated" in err


def test_output_in_missing_folder(capsys, tiny_model_dir, tmp_path):
    err = run_convert(capsys, tiny_model_dir, tmp_path / "no" / "such" / "out.gguf")
    assert "does not exist" in err


def test_existing_output_survives_a_failed_conversion(capsys, model_copy, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"previous result")
    (model_copy / "config.json").write_text("{ not json")
    code = main(["convert", str(model_copy), "-o", str(out), "-q"])
    assert code != 0 and "not valid JSON" in capsys.readouterr().err
    assert out.read_bytes() == b"previous result"


def test_interrupted_write_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    """An exception in the middle of writing tensors removes the temporary file."""
    from mc_gguf.gguf_io import convert as convert_module

    out = tmp_path / "out.gguf"
    real_encode = convert_module.encode
    calls = {"n": 0}

    def failing_encode(data, qtype):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_encode(data, qtype)

    monkeypatch.setattr(convert_module, "encode", failing_encode)
    with pytest.raises(KeyboardInterrupt):
        convert_module.convert(tiny_model_dir, out, "f16", progress=False)
    assert not out.exists() and not list(tmp_path.iterdir())
