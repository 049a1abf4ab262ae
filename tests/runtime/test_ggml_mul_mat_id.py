"""MUL_MAT_ID's mc-gguf extensions in the installed runtime's ggml, on the CPU backend.

The C++ tests ship in the patch series (tests/test-mul-mat-id-*.cpp): negative
("skip this slot") expert ids, and MUL_MAT_ID_GROUPS (experts in tensors of
different types). They are compiled here against the installed libggml, so what
is tested is the library llama_cpp loads; each compares every case with a naive
reference, and the groups op also with one MUL_MAT_ID per group, bit for bit.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from mc_gguf.runtime.build import installed_library_dir
from mc_gguf.runtime.source import patched_source


def _run_ggml_test(name: str, tmp_path) -> tuple[int, str]:
    """Compile tests/NAME.cpp of the patched tree against the installed libggml, run it, check
    that no case failed, and return its number of passed cases and its output."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.fail(f"a C++ compiler is needed to build {name}")
    source = patched_source()
    lib = installed_library_dir()
    assert lib is not None and (lib / "libggml.so").exists()
    binary = tmp_path / name
    subprocess.run(
        [compiler, "-O2", "-std=c++17", f"-I{source / 'ggml' / 'include'}",
         str(source / "tests" / f"{name}.cpp"), "-o", str(binary),
         f"-L{lib}", "-lggml", "-lggml-base", f"-Wl,-rpath,{lib}"],
        check=True,
    )
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600)
    print(result.stdout)
    summary = re.search(r"^(\d+) passed, (\d+) failed", result.stdout, re.M)
    assert summary, result.stdout + result.stderr
    passed, failed = map(int, summary.groups())
    assert result.returncode == 0 and failed == 0, result.stdout
    return passed, result.stdout


def test_mul_mat_id_skips_negative_ids_on_cpu(tmp_path):
    passed, _ = _run_ggml_test("test-mul-mat-id-skip", tmp_path)
    # 10 types x 4 token counts x 2 src1 layouts on the plain CPU buffer at least
    assert passed >= 80


def test_mul_mat_id_groups_equals_one_mul_mat_id_per_group_on_cpu(tmp_path):
    passed, output = _run_ggml_test("test-mul-mat-id-groups", tmp_path)
    # 4 sets of types x 4 token counts x 2 src1 layouts with plain groups at least
    assert passed >= 32
    # where the CPU repacks weights, repacked (*) and plain groups met in one op
    if "extra buffer type" in output:
        assert re.search(r"\w+\*x\d+,\w+x\d+|\w+x\d+,\w+\*x\d+", output)
