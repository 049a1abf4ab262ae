"""Build and install the patched llama.cpp runtime: a wheel of the patched sdist (source.py), cached.

The steps: the patched source tree (source.py), a wheel built from it with
scikit-build-core, installed with pip. The wheel is cached under a key made of the
sdist hash, the patch series and the build flags, so a second run installs in
seconds. The patched source and the CMake build folder live at stable paths
and only files whose content changed are rewritten, so a changed patch
rebuilds only what it touches (ccache, when installed, covers the rest).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from mc_gguf.errors import RuntimeBuildError
from mc_gguf.runtime.source import (
    BUILD_INFO_FILE,
    BuildFlags,
    CacheLock,
    build_key,
    cache_root,
    fetch_sdist,
    prepare_source,
    run_checked,
)

_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]")


def _build_env(flags: BuildFlags) -> dict:
    env = dict(os.environ)
    env["CMAKE_ARGS"] = " ".join(flags.cmake_args())
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
    return env


def build_wheel(cache: Path, source: Path, flags: BuildFlags, wheel_dir: Path) -> Path:
    """Run ``pip wheel`` on the patched tree, showing the compile steps as a progress bar."""
    build_dir = cache / "build" / f"wheel-{flags.label()}"
    log_path = cache / "logs" / f"build-{flags.label()}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-v",
           "-w", str(wheel_dir), "-C", f"build-dir={build_dir}", str(source)]
    with open(log_path, "w") as log, tqdm(total=None, desc=f"building llama.cpp ({flags.label()})",
                                          unit="step", dynamic_ncols=True) as bar:
        proc = subprocess.Popen(cmd, env=_build_env(flags), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            step = _NINJA_STEP.match(line.strip())
            if step:
                bar.total = int(step.group(2))
                bar.n = int(step.group(1))
                bar.refresh()
        proc.wait()
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-20:]
        raise RuntimeBuildError(f"building the wheel failed (full log: {log_path}):\n" + "\n".join(tail))
    wheels = sorted(wheel_dir.glob("llama_cpp_python-*.whl"))
    if not wheels:
        raise RuntimeBuildError(f"pip wheel produced no wheel (log: {log_path})")
    return wheels[-1]


def install_wheel(wheel: Path) -> None:
    print(f"installing {wheel.name}", flush=True)
    # --force-reinstall --no-deps replaces a llama_cpp of the same version built
    # from another patch level; the second call pulls in its dependencies.
    run_checked([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q",
          "--force-reinstall", "--no-deps", str(wheel)], "installing the wheel")
    run_checked([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", str(wheel)],
         "installing the wheel's dependencies")


def _installed_package_dir() -> Path | None:
    """The installed ``llama_cpp`` package folder, found without importing it (or None)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def shared_library(folder: Path, name: str, system: str | None = None) -> Path | None:
    """The shared library ``name`` (e.g. ``ggml-base``) in ``folder`` as this platform names it, or None.

    Linux ``libNAME.so``, macOS ``libNAME.dylib``, Windows ``NAME.dll`` (or ``libNAME.dll``, as MinGW builds
    name it): what llama-cpp-python's ``_ctypes_extensions.load_shared_library`` looks for.
    """
    system = system or platform.system()
    candidates = {"Darwin": [f"lib{name}.so", f"lib{name}.dylib"],
                  "Windows": [f"{name}.dll", f"lib{name}.dll"]}.get(system, [f"lib{name}.so"])
    for candidate in candidates:
        if (folder / candidate).exists():
            return folder / candidate
    return None


def loaded_library(folder: Path, name: str) -> Path | None:
    """The file of library ``name`` in ``folder`` that the dynamic linker opens when libllama needs it: its
    soname (``libggml.so.0``; ``libggml.0.dylib`` on macOS), else shared_library's name. A wheel holds
    ``libggml.so`` as a file of its own (zip keeps no links), which glibc would map as a second library with
    its own state (ggml's device registry among it)."""
    pattern = re.compile(rf"lib{re.escape(name)}(\.so\.\d+|\.\d+\.dylib)")
    for candidate in sorted(folder.iterdir()) if folder.is_dir() else ():
        if pattern.fullmatch(candidate.name):
            return candidate
    return shared_library(folder, name)


def installed_library_dir() -> Path | None:
    """``llama_cpp/lib`` of the installed runtime (libllama, libggml*), or None."""
    package = _installed_package_dir()
    return package / "lib" if package else None


def installed_build_info() -> dict | None:
    """The build info of the installed llama_cpp, or None when it is not ours (or absent)."""
    package = _installed_package_dir()
    info = package / BUILD_INFO_FILE if package else None
    if info is None or not info.exists():
        return None
    return json.loads(info.read_text())


def cached_or_built_wheel(cache: Path, flags: BuildFlags, force: bool) -> Path:
    """The wheel for ``flags`` from the cache, built first when absent (call under the cache lock)."""
    wheel_dir = cache / "wheels" / build_key(flags)
    cached = sorted(wheel_dir.glob("llama_cpp_python-*.whl"))
    if cached and not force:
        return cached[-1]
    source = prepare_source(cache, fetch_sdist(cache), flags)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        wheel = build_wheel(cache, source, flags, Path(tmp))
        wheel_dir.mkdir(parents=True, exist_ok=True)
        final = wheel_dir / wheel.name
        os.replace(wheel, final)
    return final


def ensure_runtime(flags: BuildFlags = BuildFlags(), force: bool = False) -> Path:
    """Install the patched runtime for ``flags``, building it only when no cached wheel exists.

    Returns the wheel that is installed.
    """
    if flags.stock:
        raise RuntimeBuildError("the stock build is a test reference and is not installed")
    cache = cache_root()
    key = build_key(flags)
    with CacheLock(cache):
        installed = installed_build_info()
        if not force and installed and installed.get("build_key") == key and (cache / "wheels" / key).is_dir():
            print(f"patched runtime {key} ({flags.label()}) is installed", flush=True)
            return sorted((cache / "wheels" / key).glob("llama_cpp_python-*.whl"))[-1]
        wheel = cached_or_built_wheel(cache, flags, force)
        install_wheel(wheel)
        return wheel
