#!/usr/bin/env python3
"""Compile the CUDA files the patch series touches, for one GPU architecture, with nvcc.

CUDA code cannot run without a GPU, but it can be compiled: this configures
the patched llama.cpp tree with GGML_CUDA=ON and builds only the object files
of the .cu files the patches change. Prints one JSON object (per-file status
and seconds); exits non-zero if any file fails to compile.

    python scripts/cuda_compile_check.py [--arch 86] [--files mmid.cu,mmvq.cu]
        [--cublas-include DIR]

Only object files are built, so cuBLAS is needed for its headers alone: when
the CUDA toolkit has none, point --cublas-include at the include/ folder of
the PyPI package nvidia-cublas (``pip download --no-deps nvidia-cublas`` and
unzip it); empty CUDA::cublas (and CUDA::cuda_driver) targets then stand in for the
libraries, which linking would need but compiling does not.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mc_gguf.runtime.source import cache_root, patch_series, patched_source


def touched_cuda_files() -> list[str]:
    """The ggml-cuda .cu files named in the patch series' diffs."""
    names = set()
    for patch in patch_series():
        names.update(re.findall(r"^\+\+\+ b/ggml/src/ggml-cuda/([\w.-]+\.cu)$", patch.read_text(), re.M))
    return sorted(names)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="86", help="CMAKE_CUDA_ARCHITECTURES (default: 86)")
    parser.add_argument("--files", help="comma-separated .cu files (default: those the patches touch)")
    parser.add_argument("--cublas-include", help="cuBLAS headers, when the CUDA toolkit lacks them")
    args = parser.parse_args()

    if shutil.which("nvcc") is None:
        print(json.dumps({"error": "nvcc not found"}))
        return 2
    source = patched_source().parent.parent  # the sdist root; llama.cpp is vendor/llama.cpp
    llama_cpp_tree = source / "vendor" / "llama.cpp"
    build = cache_root() / "build" / f"cuda-check-sm{args.arch}"
    files = args.files.split(",") if args.files else touched_cuda_files()

    extra = []
    if args.cublas_include:
        build.mkdir(parents=True, exist_ok=True)
        stand_in = build / "cublas-stand-in.cmake"
        # Defined before find_package(CUDAToolkit), so it keeps these names for the stand-ins.
        stand_in.write_text(
            "foreach(t cublas cublasLt cublas_static cublasLt_static cuda_driver)\n"
            "  if(NOT TARGET CUDA::${t})\n    add_library(CUDA::${t} INTERFACE IMPORTED)\n"
            f"    target_include_directories(CUDA::${{t}} INTERFACE \"{Path(args.cublas_include).resolve()}\")\n"
            "  endif()\nendforeach()\n"
        )
        extra.append(f"-DCMAKE_PROJECT_INCLUDE={stand_in}")
    configure = subprocess.run(
        ["cmake", "-S", str(llama_cpp_tree), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
         "-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={args.arch}", "-DLLAMA_BUILD_TESTS=OFF",
         "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF",
         *extra],
        capture_output=True, text=True,
    )
    if configure.returncode != 0:
        print(json.dumps({"error": "cmake configure failed", "log": configure.stderr[-3000:]}))
        return 1

    results = []
    for name in files:
        target = f"ggml/src/ggml-cuda/CMakeFiles/ggml-cuda.dir/{name}.o"
        started = time.perf_counter()
        proc = subprocess.run(["cmake", "--build", str(build), "--target", target], capture_output=True, text=True)
        entry = {"file": name, "ok": proc.returncode == 0, "seconds": round(time.perf_counter() - started, 1)}
        if proc.returncode != 0:
            entry["log"] = (proc.stdout + proc.stderr)[-3000:]
        results.append(entry)
        print(f"{name}: {'ok' if entry['ok'] else 'FAILED'} ({entry['seconds']} s)", file=sys.stderr, flush=True)
    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    print(json.dumps({"nvcc": nvcc, "arch": args.arch, "files": results,
                      "all_ok": all(r["ok"] for r in results)}, indent=2))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
