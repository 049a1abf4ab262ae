"""scripts/check_patches.py's checks of the series as a whole (make check-patches builds and tests it patch by
patch): the series passes them, and a copy with each defect they look for fails with that defect named."""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest

from mc_gguf.runtime.source import patch_series

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_patches.py"


@pytest.fixture(scope="module")
def check_patches():
    spec = importlib.util.spec_from_file_location("check_patches", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_patches"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def series(tmp_path) -> list[Path]:
    for patch in patch_series():
        shutil.copy(patch, tmp_path / patch.name)
    return sorted(tmp_path.glob("*.patch"))


def edit(patch: Path, pattern: str, replacement: str) -> None:
    text = patch.read_text()
    edited = re.sub(pattern, replacement, text, count=1, flags=re.M)
    assert edited != text, pattern
    patch.write_text(edited)


def test_the_series_passes(check_patches, series):
    assert check_patches.header_problems(series) == []
    assert len(series) <= 12


def test_a_subject_numbered_out_of_place_is_named(check_patches, series):
    edit(series[2], r"^Subject: \[PATCH 03/", "Subject: [PATCH 04/")
    assert check_patches.header_problems(series) == [
        f"{series[2].name}: the subject does not say [PATCH 3/{len(series)}]"]


def test_a_diffstat_that_misses_a_file_is_named(check_patches, series):
    patch = next(p for p in series if len(check_patches.parse_patch(p).files) > 1)
    stat = check_patches.stat_files(patch.read_text())
    edit(patch, rf"^ {re.escape(stat[0])}\s+\|.*\n", "")
    problems = check_patches.header_problems(series)
    assert len(problems) == 1 and problems[0].startswith(f"{patch.name}: the diffstat names {len(stat) - 1} files")


def test_a_second_patch_level_and_a_bump_are_named(check_patches, series):
    last = series[-1]
    last.write_text(last.read_text() + "diff --git a/include/llama.h b/include/llama.h\n"
                    "--- a/include/llama.h\n+++ b/include/llama.h\n@@ -1,1 +1,1 @@\n"
                    "-    #define LLAMA_MC_PATCH_LEVEL 14\n+    #define LLAMA_MC_PATCH_LEVEL 15\n")
    problems = check_patches.header_problems(series)
    assert f"{last.name}: changes LLAMA_MC_PATCH_LEVEL (define it once)" in problems
    assert any(p.startswith("LLAMA_MC_PATCH_LEVEL is defined by 2 patches") for p in problems)


def test_a_list_of_backend_names_in_ggml_backend_is_named(check_patches, series):
    patch = next(p for p in series if "diff --git a/ggml/src/ggml-backend.cpp" in p.read_text())
    edit(patch, r"^\+static bool ggml_backend_dev_skips_mul_mat_id_slots.*$",
         r'\g<0>\n+    for (const char * skips : { "CPU", "CUDA" }) {}')
    assert f"{patch.name}: names backends in ggml-backend.cpp (CPU, CUDA)" in check_patches.header_problems(series)


def test_a_long_patch_is_named_unless_it_adds_the_fused_op(check_patches, series):
    fused = next(p for p in series if "+        GGML_OP_MUL_MAT_ID_GROUPS," in p.read_text())
    other = next(p for p in series if p != fused)
    for patch in (fused, other):
        patch.write_text(patch.read_text() + "\n" * check_patches.MAX_LINES)
    problems = check_patches.header_problems(series)
    assert [p for p in problems if "lines (at most" in p] == [
        f"{other.name}: {other.read_text().count(chr(10))} lines (at most {check_patches.MAX_LINES}, "
        "except the fused op's patch)"]
