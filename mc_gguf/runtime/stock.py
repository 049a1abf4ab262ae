"""llama.cpp as the pinned sdist ships it, built once and cached: the reference the tests compare the
patched runtime with (its libraries), and the tools the benchmarks run as peers. Of mc-gguf's patches it
gets only source.STOCK_WORKAROUNDS (AMX repacking off unless LLAMA_MC_AMX=1), which changes no result.
``tools_dir`` builds llama.cpp's command-line tools from either tree (the patched one with Vulkan for
make test-vulkan)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

from mc_gguf.errors import RuntimeBuildError
from mc_gguf.runtime.build import cached_or_built_wheel, shared_library
from mc_gguf.runtime.source import VENDOR_DIR, BuildFlags, CacheLock, build_key, cache_root, current_source


def stock_library_dir() -> Path:
    """``llama_cpp/lib`` of an unpatched CPU build of the pinned sdist, built once and cached.

    Point ``LLAMA_CPP_LIB_PATH`` at it to run llama_cpp on stock llama.cpp.
    """
    flags = BuildFlags(stock=True)
    cache = cache_root()
    target = cache / "stock-lib" / build_key(flags)
    with CacheLock(cache):
        if not (target.is_dir() and shared_library(target, "llama")):
            wheel = cached_or_built_wheel(cache, flags, force=False)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                with zipfile.ZipFile(wheel) as archive:
                    members = [m for m in archive.namelist() if m.startswith("llama_cpp/lib/")]
                    archive.extractall(tmp, members)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(target, ignore_errors=True)
                os.replace(Path(tmp) / "llama_cpp" / "lib", target)
    return target


# llama.cpp's own command-line tools that the quality benchmark runs
# (its quantization recipes and importance matrix); built from the stock tree.
STOCK_TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")


def stock_tools_dir(tools: tuple[str, ...] = STOCK_TOOLS) -> Path:
    """A folder with llama.cpp's ``tools`` built from the unpatched pinned sdist, built once and cached."""
    return tools_dir(BuildFlags(stock=True), tools)


def tools_dir(flags: BuildFlags, tools: tuple[str, ...]) -> Path:
    """A folder with llama.cpp's command-line ``tools`` (CMake targets: ``llama-*`` tools, ``test-*`` tests)
    built from the sdist tree of ``flags``, built once and cached.

    Only the named targets are built (static libraries, so the binaries run on their own); ccache is used
    when installed. CMake's own lookups apply: ``VULKAN_SDK`` points FindVulkan at other Vulkan headers.
    """
    cache = cache_root()
    target = cache / "tools" / build_key(flags)
    if all((target / name).exists() for name in tools):
        return target
    with CacheLock(cache):
        source = current_source(cache, flags)
        build_dir = cache / "build" / f"tools-{flags.label()}"
        log_path = cache / "logs" / f"build-tools-{flags.label()}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        tests = any(name.startswith("test-") for name in tools)
        configure = ["cmake", "-S", str(source / VENDOR_DIR), "-B", str(build_dir), "-G", "Ninja",
                     "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TOOLS=ON",
                     f"-DLLAMA_BUILD_TESTS={'ON' if tests else 'OFF'}", "-DLLAMA_BUILD_EXAMPLES=OFF",
                     "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
                     *(a for a in flags.cmake_args() if a.startswith(("-DGGML_VULKAN", "-DGGML_CUDA", "-DGGML_METAL")))]
        if shutil.which("ccache"):
            configure += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
        if not shutil.which("ninja"):
            configure.remove("-G")
            configure.remove("Ninja")
        with open(log_path, "w") as log:
            for cmd, what in ((configure, "configuring llama.cpp's tools"),
                              (["cmake", "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1),
                                "--target", *tools], f"building llama.cpp's {', '.join(tools)} ({flags.label()})")):
                print(f"{what} (log: {log_path}) ...", flush=True)
                result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
                if result.returncode != 0:
                    tail = log_path.read_text().splitlines()[-20:]
                    raise RuntimeBuildError(f"{what} failed (full log: {log_path}):\n" + "\n".join(tail))
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            staged = Path(tmp) / "tools"
            staged.mkdir()
            for name in tools:
                shutil.copy2(build_dir / "bin" / name, staged / name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staged, target)
    return target
