"""The runtime builder: sdist pinning, patch application, build keys, and the installed build."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mc_gguf.errors import RuntimeBuildError
from mc_gguf.runtime import source
from mc_gguf.runtime.status import REQUIRED_PATCH_LEVEL, require_patched_runtime, runtime_status


def test_installed_runtime_is_patched_and_current():
    status = require_patched_runtime()
    assert status.patch_level >= REQUIRED_PATCH_LEVEL
    assert status.build_info is not None
    assert status.build_info["patches"] == [p.name for p in source.patch_series()]
    assert status.build_info["build_key"] == source.build_key(source.BuildFlags())


def test_sdist_with_wrong_hash_is_refused(tmp_path):
    sdist = tmp_path / "sdist" / source.SDIST_FILE
    sdist.parent.mkdir()
    sdist.write_bytes(b"not the pinned sdist")
    with pytest.raises(RuntimeBuildError, match="pinned sha256"):
        source.fetch_sdist(tmp_path)


def _tree_with_file(root: Path, text: str) -> Path:
    vendor = root / source.VENDOR_DIR
    (vendor / "src").mkdir(parents=True)
    (vendor / "src" / "a.cpp").write_text(text)
    return vendor


def test_patch_that_does_not_apply_names_patch_and_file(tmp_path):
    tree = tmp_path / "tree"
    _tree_with_file(tree, "int a = 1;\nint b = 2;\n")
    patch = tmp_path / "0009-change-c.patch"
    patch.write_text(
        "header text a reviewer reads\n---\n"
        "diff --git a/src/a.cpp b/src/a.cpp\n--- a/src/a.cpp\n+++ b/src/a.cpp\n"
        "@@ -1,2 +1,2 @@\n int a = 1;\n-int c = 3;\n+int c = 4;\n"
    )
    with pytest.raises(RuntimeBuildError) as info:
        source.apply_patches(tree, [patch])
    assert "0009-change-c.patch" in str(info.value) and "src/a.cpp" in str(info.value)
    assert (tree / source.VENDOR_DIR / "src" / "a.cpp").read_text() == "int a = 1;\nint b = 2;\n"


def test_series_applies_to_the_pinned_sdist_tree(tmp_path):
    """Every patch in patches/ applies, in order, to llama.cpp as vendored by the pinned sdist."""
    sdist = source.cache_root() / "sdist" / source.SDIST_FILE
    if not sdist.exists():
        pytest.skip("the sdist is fetched by `mc-gguf runtime build`")
    # The whole sdist: vendor/llama.cpp/.git points into the sdist's top-level .git.
    subprocess.run(["tar", "xzf", str(sdist), "-C", str(tmp_path)], check=True)
    source.apply_patches(tmp_path / source.SDIST_FILE.removesuffix(".tar.gz"), source.patch_series())


def test_build_key_changes_with_flags_and_patches(tmp_path, monkeypatch):
    cpu = source.build_key(source.BuildFlags())
    assert cpu != source.build_key(source.BuildFlags(cuda=True))
    patches = tmp_path / "patches"
    patches.mkdir()
    for p in source.patch_series():
        (patches / p.name).write_bytes(p.read_bytes())
    monkeypatch.setattr(source, "patches_dir", lambda: patches)
    assert source.build_key(source.BuildFlags()) == cpu
    (patches / "9999-extra.patch").write_text("x")
    assert source.build_key(source.BuildFlags()) != cpu


def test_sync_tree_rewrites_only_changed_files(tmp_path):
    fresh, stable = tmp_path / "fresh", tmp_path / "stable"
    for root in (fresh, stable):
        (root / "d").mkdir(parents=True)
        (root / "d" / "same.c").write_text("same")
    (fresh / "d" / "changed.c").write_text("new")
    (stable / "d" / "changed.c").write_text("old")
    (stable / "d" / "gone.c").write_text("gone")
    before = (stable / "d" / "same.c").stat().st_mtime_ns
    assert source._sync_tree(fresh, stable) == 1
    assert (stable / "d" / "changed.c").read_text() == "new"
    assert not (stable / "d" / "gone.c").exists()
    assert (stable / "d" / "same.c").stat().st_mtime_ns == before


def test_status_reports_the_library_file():
    status = runtime_status()
    assert status.library is not None and status.library.name.startswith("libllama")


@pytest.mark.parametrize("system, files, expected", [
    ("Linux", ["libggml-base.so"], "libggml-base.so"),
    ("Darwin", ["libggml-base.dylib"], "libggml-base.dylib"),
    ("Windows", ["ggml-base.dll"], "ggml-base.dll"),
    ("Windows", ["libggml-base.dll"], "libggml-base.dll"),
    ("Linux", ["libggml-base.dylib"], None),
])
def test_shared_libraries_are_found_as_each_platform_names_them(tmp_path, system, files, expected):
    from mc_gguf.runtime.build import shared_library

    for name in files:
        (tmp_path / name).write_bytes(b"")
    found = shared_library(tmp_path, "ggml-base", system)
    assert (found.name if found else None) == expected


def test_the_installed_runtimes_ggml_is_found_here():
    from mc_gguf.runtime.build import installed_library_dir, shared_library

    assert shared_library(installed_library_dir(), "ggml-base") is not None


def test_the_rpc_backend_compiles_with_the_patch_series():
    """-DGGML_RPC=ON is not cut off: ggml-rpc.cpp compiles against the patched headers (0005 adds an op, which
    ggml-rpc.h's op count includes), and speaks a protocol major version stock peers refuse."""
    import re
    import shutil

    vendor = source.patched_source()
    compiler = shutil.which("c++") or shutil.which("g++")
    assert compiler, "a C++ compiler builds the runtime"
    ggml = vendor / "ggml"
    result = subprocess.run([compiler, "-std=c++17", "-fsyntax-only", "-I", str(ggml / "include"), "-I",
                             str(ggml / "src"), str(ggml / "src" / "ggml-rpc" / "ggml-rpc.cpp")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    stock = (source.patched_source(source.BuildFlags(stock=True)) / "ggml" / "include" / "ggml-rpc.h").read_text()
    patched = (vendor / "ggml" / "include" / "ggml-rpc.h").read_text()
    major = re.compile(r"#define RPC_PROTO_MAJOR_VERSION\s+(\d+)")
    assert major.search(patched).group(1) != major.search(stock).group(1)
