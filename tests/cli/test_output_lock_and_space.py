"""Outputs: a second run on the same output is refused while the first runs (and the first finishes); a disk too
small for the work is a clear error, never SIGBUS; nothing half-written is left."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mc_gguf.atomic import lock_path, output_lock
from mc_gguf.errors import OutputPathError

from conftest import CALIBRATION_TEXT


def mc_gguf(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mc_gguf", *argv], capture_output=True, text=True,
                          timeout=timeout, check=False)


def one_error_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("mc-gguf: error:")]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "this is a bug" not in result.stderr
    return lines[0]


def test_a_lock_is_shared_by_nested_blocks_and_refuses_another_process(tmp_path):
    out = tmp_path / "out.gguf"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from mc_gguf.atomic import output_lock\n"
        f"with output_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputPathError, match=f"another mc-gguf \\(process {holder.pid}\\) is writing it"):
            with output_lock(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock went with it, the stale lock file is taken over
    with output_lock(out):
        with output_lock(out):  # the same process: shared
            assert lock_path(out.resolve()).exists()
    assert not lock_path(out.resolve()).exists()


def test_a_second_calibration_of_the_same_output_is_refused_and_the_first_finishes(tiny_model_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(CALIBRATION_TEXT * 4)
    out = tmp_path / "tiny.stats"
    argv = ["calibrate", str(tiny_model_dir), "--text", str(text), "-o", str(out), "--tokens", "2048",
            "--types", "Q4_K", "Q8_0"]
    first = subprocess.Popen([sys.executable, "-m", "mc_gguf", *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        work = Path(str(out) + ".partial.d")
        deadline = time.monotonic() + 120
        while not work.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert work.exists(), "the first calibration did not start its work"
        second = mc_gguf(*argv, timeout=120)
        one_error_line(second, str(out), f"another mc-gguf (process {first.pid}) is writing it")
        assert work.exists() or out.exists()  # the second one removed nothing
        _, err = first.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            first.kill()
    assert first.returncode == 0, err[-2000:]
    from mc_gguf.calibrate.stats import load_stats

    assert load_stats(out).types == ["Q4_K", "Q8_0"]
    assert not lock_path(out).exists()


@pytest.fixture()
def small_disk(tmp_path):
    """A 3 MB tmpfs (where this test may mount one)."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mount)], capture_output=True,
                          check=False)
    if made.returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_calibration_is_an_error_not_sigbus(tiny_model_dir, small_disk, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(CALIBRATION_TEXT * 4)
    out = small_disk / "tiny.stats"
    # 1024 tokens x 256 features: 1 MB per hidden-state file, two of them and the MoE inputs do not fit in 3 MB
    result = mc_gguf("calibrate", str(tiny_model_dir), "--text", str(text), "-o", str(out), "--tokens", "1024",
                     "--seq-len", "128", "--types", "Q8_0", "--hessian")
    one_error_line(result, "no space left on the device")
    assert not out.exists()


def test_a_gguf_larger_than_the_free_space_is_refused_before_it_is_written(tiny_model_dir, small_disk):
    out = small_disk / "tiny.gguf"
    result = mc_gguf("convert", str(tiny_model_dir), "-o", str(out), "--type", "f16", "-q")
    one_error_line(result, f"writing {out} needs", "GB free")
    assert list(small_disk.iterdir()) == []
