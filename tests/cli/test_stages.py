"""The stage commands give compress's file: calibrate -> tuned-errors -> allocate -> quantize, with the flags that
spell compress's defaults, write the same bytes as `mc-gguf compress` (README "Commands": stage by stage)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mc_gguf.allocate.cost import COMPRESS_COST
from mc_gguf.settings import CompressSettings

CALIBRATION = ["--tokens", "1024", "--seq-len", "128"]  # small, alike in both runs
TYPES = ["IQ2_XS", "Q2_K", "Q4_K"]
BITS = "3"


def mc_gguf(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "mc_gguf.cli", *args], capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stderr
    return result


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    from conftest import CALIBRATION_TEXT

    path = tmp_path_factory.mktemp("stages") / "calib.txt"
    path.write_text(CALIBRATION_TEXT, encoding="utf-8")
    return path


def test_the_stages_with_compress_settings_write_compress_file(tiny_model_dir, text, tmp_path):
    model = str(tiny_model_dir)
    mc_gguf("compress", model, "--bits", BITS, "--calib", str(text), "--types", *TYPES, *CALIBRATION,
            "--keep-artifacts", str(tmp_path / "work"), "-o", str(tmp_path / "compress.gguf"), "-q")

    defaults = CompressSettings().resolved()
    assert defaults.calibration.hessian and defaults.tune is not None and defaults.allocation.per_projection
    assert {k: getattr(defaults.allocation, k) for k in COMPRESS_COST} == COMPRESS_COST
    stats, tuned, plan = (str(tmp_path / name) for name in ("tiny.stats", "tuned.json", "plan.json"))
    mc_gguf("calibrate", model, "--text", str(text), "--types", *TYPES, *CALIBRATION, "--hessian", "-o", stats, "-q")
    mc_gguf("tuned-errors", model, stats, "-o", tuned, "-q")
    mc_gguf("allocate", stats, "--bits", BITS, "--per-projection",
            *[f"--{k}={v:g}" for k, v in COMPRESS_COST.items()], "--error-scale", tuned, "-o", plan)
    mc_gguf("quantize", model, "--plan", plan, "--stats", stats, "--tune", "-o", str(tmp_path / "stages.gguf"),
            "-q")

    # the artifacts compress kept are the stages' own
    assert json.loads(Path(tuned).read_text())["ratios"] == \
        json.loads((tmp_path / "work" / "tuned_errors.json").read_text())["ratios"]
    assert json.loads(Path(plan).read_text())["experts"] == \
        json.loads((tmp_path / "work" / "plan.json").read_text())["experts"]
    assert sha256(tmp_path / "stages.gguf") == sha256(tmp_path / "compress.gguf")


def test_allocate_refuses_ratios_measured_on_other_statistics(calibration, tmp_path):
    from mc_gguf.quantize.tuned_errors import TunedErrors

    stats_path, stats = calibration
    other = TunedErrors({"Q2_K": 0.5}, {"types": ["Q2_K"], "text_sha256": "0" * 64, "iters": 8, "min_gain": 0.005})
    other.save(tmp_path / "other.json")
    result = subprocess.run([sys.executable, "-m", "mc_gguf.cli", "allocate", str(stats_path), "--bits", "3",
                             "--error-scale", str(tmp_path / "other.json"), "-o", str(tmp_path / "plan.json")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "measured on other statistics" in result.stderr
    assert not (tmp_path / "plan.json").exists()
    (tmp_path / "bad.json").write_text(json.dumps({"format": "mc-gguf tuned errors 1", "key": {},
                                                    "ratios": {"Q2_K": -1}}))
    result = subprocess.run([sys.executable, "-m", "mc_gguf.cli", "allocate", str(stats_path), "--bits", "3",
                             "--error-scale", str(tmp_path / "bad.json"), "-o", str(tmp_path / "plan.json")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "not a positive number" in result.stderr
