"""The patched loader refuses a file's inconsistent hyper-parameters with the key and value (patch 0006), where
stock llama.cpp asserts and aborts the process: llama-cpp-python called directly, without mc-gguf's own check
(gguf_io/validate.py) in front, raises and goes on."""

from __future__ import annotations

import subprocess
import sys

import gguf
import pytest
from gguf.scripts.gguf_new_metadata import MetadataDetails

from mc_gguf.gguf_io.edit import rewrite_metadata
from mc_gguf.gguf_io.header import scan

T = gguf.GGUFValueType

# loads the file with llama-cpp-python alone, prints llama.cpp's log on stderr, exits 3 when the load raised
LOAD = """
import sys, llama_cpp
try:
    llama_cpp.Llama(model_path=sys.argv[1], verbose=True, n_ctx=64)
except ValueError:
    sys.exit(3)
"""


@pytest.mark.parametrize("change, reason", [
    ({"llama.block_count": (T.UINT32, 600)}, "llama.block_count is 600; llama.cpp loads 1 to 512 layers"),
    ({"llama.expert_count": (T.UINT32, 2000)}, "llama.expert_count is 2000; llama.cpp loads at most"),
    ({"llama.expert_used_count": (T.UINT32, 9)}, "llama.expert_used_count is 9; with 4 experts it must be 1 to 4"),
    ({"llama.expert_group_count": (T.UINT32, 4)}, "llama.expert_group_count is 4; it must be below the 4 experts"),
    ({"llama.expert_group_count": (T.UINT32, 3)}, "must divide the 4 experts"),
    ({"llama.nextn_predict_layers": (T.UINT32, 5)}, "llama.nextn_predict_layers is 5, more than the 2 layers"),
    ({"llama.rope.scaling.type": (T.STRING, "bogus")}, "llama.rope.scaling.type is 'bogus'"),
    ("duplicate tokens", "tokenizer.ggml.tokens holds 32000 tokens but only 31999 distinct ones"),
])
def test_the_patched_loader_refuses_what_stock_llama_cpp_aborts_on(change, reason, converted, tmp_path):
    source = converted("q8_0")
    if change == "duplicate tokens":
        tokens = list(scan(source).fields["tokenizer.ggml.tokens"])
        tokens[300] = tokens[301]
        updates = {"tokenizer.ggml.tokens": MetadataDetails(T.ARRAY, tokens, sub_type=T.STRING)}
    else:
        updates = {key: MetadataDetails(*value) for key, value in change.items()}
    bad = rewrite_metadata(source, tmp_path / "bad.gguf", updates)
    result = subprocess.run([sys.executable, "-c", LOAD, str(bad)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, (result.returncode, result.stderr[-3000:])  # raised; not -6 (SIGABRT)
    # llama_model_load: "error loading model: error loading model hyperparameters: <reason>" (or vocabulary)
    assert any("error loading model" in line and reason in line for line in result.stderr.splitlines()), \
        result.stderr[-3000:]
