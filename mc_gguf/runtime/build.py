"""Build and install the patched llama.cpp runtime from the llama-cpp-python sdist.

The steps: download the pinned sdist and check its sha256, extract it, apply
``patches/*.patch`` (in name order) to ``vendor/llama.cpp``, build a wheel with
scikit-build-core, install it. The wheel is cached under a key made of the
sdist hash, the patch series and the build flags, so a second run installs in
seconds. The patched source and the CMake build folder live at stable paths
and only files whose content changed are rewritten, so a changed patch
rebuilds only what it touches (ccache, when installed, covers the rest).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from mc_gguf.errors import RuntimeBuildError

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
# sha256 of the PyPI sdist; it vendors llama.cpp at commit 0c1e570.
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDOR_DIR = "vendor/llama.cpp"
BUILD_INFO_FILE = "mc_gguf_build.json"

# What the wheel needs and nothing more: no multimodal library, no tools,
# examples or tests (stock_tools_dir() builds the few tools benchmarks use).
BASE_CMAKE_ARGS = (
    "-DLLAVA_BUILD=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
)


@dataclass(frozen=True)
class BuildFlags:
    """Which ggml backends to build besides the CPU, and whether to apply the patch series.

    ``stock=True`` builds llama.cpp as the sdist ships it: the reference that
    tests compare the patched runtime with. It is never installed.
    """

    cuda: bool = False
    metal: bool = False
    cuda_architectures: str | None = None
    stock: bool = False

    def patches(self) -> list[Path]:
        return [] if self.stock else patch_series()

    def cmake_args(self) -> list[str]:
        args = list(BASE_CMAKE_ARGS)
        if self.cuda:
            args.append("-DGGML_CUDA=ON")
            if self.cuda_architectures:
                args.append(f"-DCMAKE_CUDA_ARCHITECTURES={self.cuda_architectures}")
        if self.metal:
            args.append("-DGGML_METAL=ON")
        return args

    def label(self) -> str:
        parts = ["cpu"] + (["cuda"] if self.cuda else []) + (["metal"] if self.metal else [])
        return "+".join(parts) + ("-stock" if self.stock else "")


def cache_root() -> Path:
    """Where sdists, patched sources, build folders and wheels are kept."""
    if os.environ.get("MC_GGUF_CACHE"):
        return Path(os.environ["MC_GGUF_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mc-gguf"


def patches_dir() -> Path:
    """The patch series: ``patches/`` of a source checkout, or the copy shipped in the wheel."""
    package_dir = Path(__file__).resolve().parent.parent
    for candidate in (package_dir.parent / "patches", package_dir / "_patches"):
        if candidate.is_dir() and any(candidate.glob("*.patch")):
            return candidate
    raise RuntimeBuildError("the mc-gguf patch series is missing (no patches/*.patch found)")


def patch_series() -> list[Path]:
    return sorted(patches_dir().glob("*.patch"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cpu_signature() -> str:
    # GGML_NATIVE compiles for this CPU (-march=native): a wheel built here may
    # not run on another CPU, so its flags are part of the cache key.
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.system()}-{platform.machine()}-{hashlib.sha256(flags.encode()).hexdigest()[:12]}"


def build_key(flags: BuildFlags) -> str:
    """Identifies a build: the sdist, every patch's bytes, the CMake flags and the CPU."""
    digest = hashlib.sha256()
    digest.update(SDIST_SHA256.encode())
    for patch in flags.patches():
        digest.update(patch.name.encode())
        digest.update(patch.read_bytes())
    digest.update(" ".join(flags.cmake_args()).encode())
    digest.update(_cpu_signature().encode())
    return digest.hexdigest()[:16]


def build_info(flags: BuildFlags) -> dict:
    """What a patched wheel records about itself (read back by ``runtime status``)."""
    return {
        "build_key": build_key(flags),
        "sdist": SDIST_FILE,
        "sdist_sha256": SDIST_SHA256,
        "patches": [p.name for p in flags.patches()],
        "backends": flags.label(),
        "cmake_args": flags.cmake_args(),
    }


def _run(cmd: list[str], what: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-15:]
        raise RuntimeBuildError(f"{what} failed:\n" + "\n".join(detail))
    return result


def fetch_sdist(cache: Path) -> Path:
    """The pinned sdist, downloaded once with pip and checked against its sha256."""
    target = cache / "sdist" / SDIST_FILE
    if target.exists():
        if _sha256(target) != SDIST_SHA256:
            raise RuntimeBuildError(
                f"{target} does not have the pinned sha256 {SDIST_SHA256}; delete it to download again"
            )
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        print(f"downloading {SDIST_NAME}=={SDIST_VERSION} (sdist) ...", flush=True)
        _run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--disable-pip-version-check", "-d", tmp, f"{SDIST_NAME}=={SDIST_VERSION}"],
            "downloading the llama-cpp-python sdist",
        )
        downloaded = Path(tmp) / SDIST_FILE
        if not downloaded.exists():
            raise RuntimeBuildError(f"pip did not produce {SDIST_FILE}")
        actual = _sha256(downloaded)
        if actual != SDIST_SHA256:
            raise RuntimeBuildError(
                f"refusing {SDIST_FILE}: sha256 {actual} is not the pinned {SDIST_SHA256}"
            )
        os.replace(downloaded, target)
    return target


def apply_patches(tree: Path, patches: list[Path]) -> None:
    """Apply the series to ``tree`` (the sdist root); name the patch and hunk that fails."""
    vendor = tree / VENDOR_DIR
    for patch in patches:
        # --check first, so a failing series leaves nothing half-applied in this patch.
        check = subprocess.run(
            ["git", "apply", "--check", "--verbose", str(patch)], cwd=vendor, capture_output=True, text=True
        )
        if check.returncode != 0:
            failed = [line for line in check.stderr.splitlines() if line.startswith("error:")]
            raise RuntimeBuildError(
                f"patch {patch.name} does not apply to llama.cpp in {SDIST_FILE}: "
                + "; ".join(failed or check.stderr.strip().splitlines()[-3:])
            )
        _run(["git", "apply", str(patch)], f"applying {patch.name}", cwd=vendor)


def _sync_tree(fresh: Path, stable: Path) -> int:
    """Make ``stable`` equal to ``fresh``, rewriting only files whose bytes differ.

    Unchanged files keep their modification times, so the build that follows
    recompiles only what the patch series changed. Returns the number of files written.
    """
    written = 0
    fresh_files = {p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file() or p.is_symlink()}
    for rel in fresh_files:
        src, dst = fresh / rel, stable / rel
        if dst.is_file() and not dst.is_symlink() and not src.is_symlink():
            if dst.stat().st_size == src.stat().st_size and dst.read_bytes() == src.read_bytes():
                continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        shutil.copy2(src, dst, follow_symlinks=False)
        written += 1
    if stable.exists():
        for path in sorted(stable.rglob("*"), reverse=True):
            rel = path.relative_to(stable)
            if path.is_file() and rel not in fresh_files:
                path.unlink()
    return written


def _source_dir(cache: Path, flags: BuildFlags) -> Path:
    """The stable path of the patched sdist tree for ``flags`` (kept between builds)."""
    return cache / "src" / f"{SDIST_FILE.removesuffix('.tar.gz')}-{flags.label()}"


def prepare_source(cache: Path, sdist: Path, flags: BuildFlags) -> Path:
    """The patched sdist tree at a stable path, with the build info written into the package."""
    stable = _source_dir(cache, flags)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        with tarfile.open(sdist) as archive:
            archive.extractall(tmp, filter="tar")
        fresh = Path(tmp) / SDIST_FILE.removesuffix(".tar.gz")
        apply_patches(fresh, flags.patches())
        (fresh / "llama_cpp" / BUILD_INFO_FILE).write_text(json.dumps(build_info(flags), indent=2) + "\n")
        stable.mkdir(parents=True, exist_ok=True)
        _sync_tree(fresh, stable)
    return stable


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
    _run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q",
          "--force-reinstall", "--no-deps", str(wheel)], "installing the wheel")
    _run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", str(wheel)],
         "installing the wheel's dependencies")


def patched_source(flags: BuildFlags = BuildFlags()) -> Path:
    """The patched llama.cpp tree (``vendor/llama.cpp``) of the current series, prepared if absent.

    Tests compile programs against the installed runtime with its headers.
    """
    cache = cache_root()
    with _CacheLock(cache):
        return _current_source(cache, flags) / VENDOR_DIR


def _current_source(cache: Path, flags: BuildFlags) -> Path:
    """The sdist tree for ``flags`` at its stable path, prepared again when its build key is stale
    (call under the cache lock)."""
    stable = _source_dir(cache, flags)
    info = stable / "llama_cpp" / BUILD_INFO_FILE
    if not info.exists() or json.loads(info.read_text()).get("build_key") != build_key(flags):
        stable = prepare_source(cache, fetch_sdist(cache), flags)
    return stable


def _installed_package_dir() -> Path | None:
    """The installed ``llama_cpp`` package folder, found without importing it (or None)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


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


class _CacheLock:
    """An exclusive lock on the cache, so two builds never share a source tree."""

    def __init__(self, cache: Path):
        cache.mkdir(parents=True, exist_ok=True)
        self._file = open(cache / ".lock", "w")

    def __enter__(self):
        fcntl.flock(self._file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def _cached_or_built_wheel(cache: Path, flags: BuildFlags, force: bool) -> Path:
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
    with _CacheLock(cache):
        installed = installed_build_info()
        if not force and installed and installed.get("build_key") == key and (cache / "wheels" / key).is_dir():
            print(f"patched runtime {key} ({flags.label()}) is installed", flush=True)
            return sorted((cache / "wheels" / key).glob("llama_cpp_python-*.whl"))[-1]
        wheel = _cached_or_built_wheel(cache, flags, force)
        install_wheel(wheel)
        return wheel


def stock_library_dir() -> Path:
    """``llama_cpp/lib`` of an unpatched CPU build of the pinned sdist, built once and cached.

    Point ``LLAMA_CPP_LIB_PATH`` at it to run llama_cpp on stock llama.cpp.
    """
    flags = BuildFlags(stock=True)
    cache = cache_root()
    target = cache / "stock-lib" / build_key(flags)
    with _CacheLock(cache):
        if not (target / "libllama.so").exists():
            wheel = _cached_or_built_wheel(cache, flags, force=False)
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
    """A folder with llama.cpp's ``tools`` built from the unpatched pinned sdist, built once and cached.

    Only the named CMake targets are built (CPU, static libraries, so the
    binaries run on their own); ccache is used when installed.
    """
    flags = BuildFlags(stock=True)
    cache = cache_root()
    target = cache / "tools" / build_key(flags)
    if all((target / name).exists() for name in tools):
        return target
    with _CacheLock(cache):
        source = _current_source(cache, flags)
        build_dir = cache / "build" / "tools-stock"
        log_path = cache / "logs" / "build-tools-stock.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        configure = ["cmake", "-S", str(source / VENDOR_DIR), "-B", str(build_dir), "-G", "Ninja",
                     "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TOOLS=ON",
                     "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                     "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"]
        if shutil.which("ccache"):
            configure += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
        if not shutil.which("ninja"):
            configure.remove("-G")
            configure.remove("Ninja")
        with open(log_path, "w") as log:
            for cmd, what in ((configure, "configuring llama.cpp's tools"),
                              (["cmake", "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1),
                                "--target", *tools], "building llama.cpp's tools")):
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
