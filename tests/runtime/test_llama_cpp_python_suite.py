"""llama-cpp-python's own tests (from the pinned sdist) pass against the patched runtime.

Only the tests that need no model download run here: the sdist's vocab-only
GGUFs cover tokenization, chat formatting and grammars; the rest fetch real
models from a hub, which this project's machines cannot reach.
"""

from __future__ import annotations

import os
import subprocess
import sys

from mc_gguf.runtime.source import patched_source

OFFLINE_TESTS = [
    "tests/test_llama.py::test_llama_cpp_version",
    "tests/test_llama.py::test_llama_cpp_tokenization",
    "tests/test_llama_chat_format.py::test_mistral_instruct",
    "tests/test_llama_chat_format.py::test_hf_tokenizer_config_str_to_chat_formatter",
    "tests/test_llama_grammar.py::test_grammar_from_string",
    "tests/test_llama_grammar.py::test_composed_pydantic_grammar",
    "tests/test_llama_grammar.py::test_grammar_anyof",
    "tests/test_llama_speculative.py::test_find_candidate_pred_tokens",
]


def test_sdist_offline_tests_pass_on_patched_runtime(tmp_path):
    # The sdist root holds a source copy of the llama_cpp package; run from a folder that
    # has only its tests/ and vendor/ (for the vocab GGUFs), so the installed package is tested.
    sdist_root = patched_source().parent.parent
    for name in ("tests", "vendor"):
        (tmp_path / name).symlink_to(sdist_root / name)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *OFFLINE_TESTS],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert f"{len(OFFLINE_TESTS)} passed" in result.stdout
