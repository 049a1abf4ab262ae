"""Is the installed llama_cpp the patched runtime, and at which patch level?"""

from __future__ import annotations

import ctypes
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from mc_gguf.errors import RuntimeMissingError
from mc_gguf.runtime.build import installed_build_info
from mc_gguf.runtime.source import BuildFlags, build_key

# The LLAMA_MC_PATCH_LEVEL that this version of the bindings needs.
REQUIRED_PATCH_LEVEL = 15


@dataclass
class RuntimeStatus:
    installed: bool
    version: str | None = None
    library: Path | None = None
    patch_level: int | None = None
    build_info: dict | None = None

    @property
    def patched(self) -> bool:
        return self.patch_level is not None

    def describe(self) -> str:
        if not self.installed:
            return "llama_cpp is not installed (run: mc-gguf runtime build)"
        lines = [f"llama_cpp {self.version} at {self.library}"]
        if not self.patched:
            lines.append("stock build: the mc-gguf patches are not in this library")
        else:
            lines.append(f"mc-gguf patch level {self.patch_level} (this mc-gguf needs {REQUIRED_PATCH_LEVEL})")
        if self.build_info:
            info = self.build_info
            current = build_key(_flags_of(info))
            state = "up to date" if info.get("build_key") == current else f"stale: the patches in this checkout build {current}"
            lines.append(f"build {info.get('build_key')} [{info.get('backends')}], {state}")
            lines.append("patches: " + ", ".join(info.get("patches", [])))
        return "\n".join(lines)


def _flags_of(info: dict) -> BuildFlags:
    backends = str(info.get("backends", "cpu")).split("+")
    args = info.get("cmake_args", [])
    arch = next((a.split("=", 1)[1] for a in args if a.startswith("-DCMAKE_CUDA_ARCHITECTURES=")), None)
    return BuildFlags(cuda="cuda" in backends, metal="metal" in backends, vulkan="vulkan" in backends,
                      cuda_architectures=arch)


def runtime_status() -> RuntimeStatus:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None:
        return RuntimeStatus(installed=False)
    import llama_cpp
    import llama_cpp.llama_cpp as bindings

    lib = bindings._lib
    level = None
    if hasattr(lib, "llama_mc_patch_level"):
        fn = lib.llama_mc_patch_level
        fn.argtypes, fn.restype = [], ctypes.c_int32
        level = int(fn())
    return RuntimeStatus(
        installed=True,
        version=getattr(llama_cpp, "__version__", None),
        library=Path(lib._name),
        patch_level=level,
        build_info=installed_build_info(),
    )


def require_patched_runtime(min_level: int = REQUIRED_PATCH_LEVEL, needed_by: str = "") -> RuntimeStatus:
    """The status, or a clear error when llama_cpp is missing, stock, or too old a patch level (``needed_by``:
    what needs ``min_level``, e.g. a file)."""
    status = runtime_status()
    if not status.installed:
        raise RuntimeMissingError("llama_cpp is not installed; run `mc-gguf runtime build`")
    if not status.patched:
        raise RuntimeMissingError(
            f"the installed llama_cpp ({status.library}) is a stock build; run `mc-gguf runtime build` "
            "to install the patched runtime"
        )
    if status.patch_level < min_level:
        raise RuntimeMissingError(
            f"the installed runtime is at mc-gguf patch level {status.patch_level}, {needed_by or 'this'} needs "
            f"{min_level}; "
            "run `mc-gguf runtime build`"
        )
    return status
