"""MUL_MAT_ID with negative ("skip this slot") expert ids, in the installed runtime's ggml.

The C++ test ships in the patch series (tests/test-mul-mat-id-skip.cpp). It is
compiled here against the installed libggml, so what is tested is the library
llama_cpp loads, and it compares every case with a naive reference.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from mc_gguf.runtime.build import installed_library_dir, patched_source


@pytest.fixture(scope="module")
def skip_test_binary(tmp_path_factory):
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.fail("a C++ compiler is needed to build test-mul-mat-id-skip")
    source = patched_source()
    lib = installed_library_dir()
    assert lib is not None and (lib / "libggml.so").exists()
    binary = tmp_path_factory.mktemp("cpp") / "test-mul-mat-id-skip"
    subprocess.run(
        [compiler, "-O2", "-std=c++17", f"-I{source / 'ggml' / 'include'}",
         str(source / "tests" / "test-mul-mat-id-skip.cpp"), "-o", str(binary),
         f"-L{lib}", "-lggml", "-lggml-base", f"-Wl,-rpath,{lib}"],
        check=True,
    )
    return binary


def test_mul_mat_id_skips_negative_ids_on_cpu(skip_test_binary):
    result = subprocess.run([str(skip_test_binary)], capture_output=True, text=True, timeout=600)
    print(result.stdout)
    summary = re.search(r"^(\d+) passed, (\d+) failed", result.stdout, re.M)
    assert summary, result.stdout + result.stderr
    passed, failed = map(int, summary.groups())
    assert result.returncode == 0 and failed == 0, result.stdout
    # 10 types x 4 token counts x 2 src1 layouts on the plain CPU buffer at least
    assert passed >= 80
