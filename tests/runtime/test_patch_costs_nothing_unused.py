"""With no skipped slot, the patched runtime computes exactly what stock llama.cpp computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mc_gguf.runtime.stock import stock_library_dir

from helpers import PROMPT, llama_cpp_logits


@pytest.fixture(scope="module")
def stock_lib() -> Path:
    return stock_library_dir()


def stock_logits(stock_lib: Path, model: Path, ids: list[int], tmp_path: Path) -> np.ndarray:
    out = tmp_path / "stock.npy"
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(stock_lib))
    helper = Path(__file__).parent.parent / "helpers.py"
    subprocess.run([sys.executable, str(helper), str(model), json.dumps(ids), str(out)], env=env, check=True)
    return np.load(out)


def test_stock_reference_is_really_stock(stock_lib):
    code = "import llama_cpp.llama_cpp as b; print(hasattr(b._lib, 'llama_mc_patch_level'), b._lib._name)"
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(stock_lib))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    has_symbol, library = out.split()
    assert has_symbol == "False" and library.startswith(str(stock_lib))


@pytest.mark.parametrize("out_type", ["f32", "q8_0"])
def test_logits_bit_identical_to_stock(stock_lib, converted, hf_tokenizer, tmp_path, out_type):
    ids = hf_tokenizer(PROMPT).input_ids
    patched = llama_cpp_logits(converted(out_type), ids)
    stock = stock_logits(stock_lib, converted(out_type), ids, tmp_path)
    assert patched.shape == stock.shape
    assert np.array_equal(patched, stock), f"max |diff| {np.abs(patched - stock).max()}"
