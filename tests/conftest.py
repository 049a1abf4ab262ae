"""Shared fixtures: a tiny seeded Mixtral built once per session, and its conversions."""

from __future__ import annotations

from pathlib import Path

import pytest

from mc_gguf.convert import convert
from mc_gguf.tiny import TinyMixtralSpec, build_tiny_mixtral


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
