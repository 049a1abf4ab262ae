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

    def failing_encode(data, qtype, *importance):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_encode(data, qtype, *importance)

    monkeypatch.setattr(convert_module, "encode", failing_encode)
    with pytest.raises(KeyboardInterrupt):
        convert_module.convert(tiny_model_dir, out, "f16", progress=False)
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["compress", "calibrate", "quantize"])
def test_a_device_this_machine_lacks_is_refused_before_any_work(capsys, tiny_model_dir, tmp_path, command):
    """--device cuda (or mps) where torch has none ends in one line, before calibration reads a token: no
    output, no work folder. The suite runs where torch is a CPU build; elsewhere the check is skipped."""
    import time

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out.gguf"
    args = {"compress": ["compress", str(tiny_model_dir), "--bits", "3", "-o", str(out)],
            "calibrate": ["calibrate", str(tiny_model_dir), "-o", str(out)],
            "quantize": ["quantize", str(tiny_model_dir), "--plan", str(tmp_path / "plan.json"), "--tune",
                         "--stats", str(tmp_path / "stats"), "-o", str(out)]}[command]
    started = time.perf_counter()
    code = main([*args, "--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.startswith("mc-gguf: error: --device cuda: ") and "\n" not in err, err
    assert time.perf_counter() - started < 30  # the imports alone: no calibration ran
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_unknown_device_is_refused_by_the_parser_and_the_api(capsys, tiny_model_dir, tmp_path):
    from mc_gguf.calibrate.settings import CalibrationSettings
    from mc_gguf.calibrate.text import CalibrationText
    from mc_gguf.errors import McGgufError
    from mc_gguf.pipeline import compress
    from mc_gguf.settings import CompressSettings
    from mc_gguf.quantize.tune import TuneSettings

    assert main(["compress", str(tiny_model_dir), "--bits", "3", "-o", str(tmp_path / "o.gguf"), "--device",
                 "tpu"]) != 0
    assert "unknown device 'tpu'" in capsys.readouterr().err
    with pytest.raises(McGgufError, match="unknown device 'tpu'"):
        compress(tiny_model_dir, tmp_path / "o.gguf", 3.0, CalibrationText("t", "some text"),
                 settings=CompressSettings(tune=TuneSettings(device="tpu")), progress=False)
    with pytest.raises(McGgufError, match="unknown device"):
        compress(tiny_model_dir, tmp_path / "o.gguf", 3.0, CalibrationText("t", "some text"),
                 settings=CompressSettings(calibration=CalibrationSettings(device="tpu"), tune=None), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_closed_pipe_ends_a_command_quietly(converted):
    """`mc-gguf inspect --json FILE | head -1`: no "Broken pipe" error, exit 0, as Unix tools end. The reader here
    closes the pipe before the first byte is written."""
    import subprocess
    import sys

    mc = str(Path(sys.executable).parent / "mc-gguf")
    result = subprocess.run(f"set -o pipefail; '{mc}' inspect --json '{converted('q8_0')}' | (exec 0<&-; sleep 5)",
                            shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("where", ["config.json", "shard", "inside"])
def test_an_output_that_is_an_input_or_inside_the_model_folder_is_refused(capsys, model_copy, where):
    """`convert M -o M/config.json` (or a shard, or any path inside M) would destroy what it reads: refused,
    the folder unchanged."""
    before = {p.name: p.read_bytes() for p in model_copy.iterdir()}
    out = {"config.json": model_copy / "config.json",
           "shard": max(model_copy.glob("model-*.safetensors")),
           "inside": model_copy / "out.gguf"}[where]
    code = main(["convert", str(model_copy), "-o", str(out), "--type", "f16", "-q"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in err and ("input" in err), err
    assert {p.name: p.read_bytes() for p in model_copy.iterdir()} == before


def test_outputs_that_are_not_regular_files_or_loop_are_refused(capsys, tiny_model_dir, tmp_path):
    """A FIFO (or a device node) is not replaced by a file, a loop of links is a clear error; a long name that
    still fits the file system works (its temporary name is shortened)."""
    import os
    import stat

    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.gguf"
    loop.symlink_to(tmp_path / "loop2.gguf")
    (tmp_path / "loop2.gguf").symlink_to(loop)
    for out, message in ((fifo, "not a regular file"), (loop, "loop of symbolic links")):
        code = main(["convert", str(tiny_model_dir), "-o", str(out), "--type", "f16", "-q"])
        err = capsys.readouterr().err.strip()
        assert code != 0 and message in err and "\n" not in err, err
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    long_name = tmp_path / ("m" * 245 + ".gguf")
    assert main(["convert", str(tiny_model_dir), "-o", str(long_name), "--type", "f16", "-q"]) == 0
    assert long_name.is_file() and [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []
