"""Shared fixtures: a tiny seeded Mixtral built once per session, and its conversions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mc_gguf.convert import convert
from mc_gguf.tiny import TinyMixtralSpec, build_tiny_mixtral

# Long enough to cross several rope periods; mixes words, digits, punctuation, unicode.
PROMPT = (
    "In 1879, the quick brown fox (aged 12) jumped over 3 lazy dogs; "
    "then it said: «Ça va?» and ran 42 km north-west, past the café."
)


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


def transformers_logits(model, token_ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float().numpy()


def llama_cpp_logits(gguf_path: Path, token_ids: list[int], **kwargs) -> np.ndarray:
    """Next-token logits at every position from llama.cpp, with an F32 KV cache.

    The default F16 KV cache rounds K and V to 11 bits, which alone moves the
    logits by ~1e-3; an F32 cache leaves only float32 summation-order noise.
    """
    from llama_cpp import GGML_TYPE_F32, Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=512, n_batch=512, logits_all=True, verbose=False,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False, seed=0, **kwargs)
    llm.eval(token_ids)
    return np.array(llm.scores[: len(token_ids)], dtype=np.float32)
