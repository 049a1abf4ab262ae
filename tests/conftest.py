"""Shared fixtures: a tiny seeded Mixtral built once per session, and its conversions."""

from __future__ import annotations

from pathlib import Path

import pytest

from mc_gguf.gguf_io.convert import convert
from mc_gguf.hf.tiny import TinyMixtralSpec, build_tiny_mixtral


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_mixtral(tmp_path_factory.mktemp("tiny-mixtral") / "model", TinyMixtralSpec(seed=1234))


@pytest.fixture(scope="session")
def converted(tiny_model_dir, tmp_path_factory):
    """converted(type) -> path of the tiny model converted to that type (converted once)."""
    out_dir = tmp_path_factory.mktemp("gguf")
    cache: dict[str, Path] = {}

    def get(out_type: str) -> Path:
        if out_type not in cache:
            cache[out_type] = convert(tiny_model_dir, out_dir / f"tiny-{out_type}.gguf", out_type, progress=False)
        return cache[out_type]

    return get


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


# A few candidate types keep calibration quick; one needs an imatrix, one is a K-quant.
TEST_TYPES = ("IQ2_XS", "Q2_K", "Q4_K", "Q8_0")
CALIBRATION_TEXT = "The quick brown fox jumps over the lazy dog. " * 10 + (
    "Experts in a mixture are chosen per token by a router; the chosen ones run, the others rest. ") * 30


@pytest.fixture(scope="session")
def calibration_settings():
    from mc_gguf.calibrate.calibration import CalibrationSettings

    # eps measured on every token (eps_tokens >= tokens), so tests can recompute it exactly
    return CalibrationSettings(n_tokens=1024, seq_len=128, seed=3, eps_tokens=4096, hessian=True, types=TEST_TYPES)


@pytest.fixture(scope="session")
def calibration(tiny_model_dir, tmp_path_factory, calibration_settings):
    """(stats path, stats) of the tiny model calibrated on CALIBRATION_TEXT."""
    from mc_gguf.calibrate.calibration import calibrate
    from mc_gguf.calibrate.text import CalibrationText

    path = tmp_path_factory.mktemp("stats") / "tiny.stats"
    stats = calibrate(tiny_model_dir, path, CalibrationText("test text", CALIBRATION_TEXT), calibration_settings,
                      progress=False)
    return path, stats
