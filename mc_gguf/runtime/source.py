"""The patched llama.cpp source: the pinned llama-cpp-python sdist, checked, extracted and patched.

The sdist is downloaded once and checked against its pinned sha256; the
patch series (``patches/*.patch``, in name order) is applied to its
``vendor/llama.cpp``. The patched tree lives at a stable path under the
cache and only files whose content changed are rewritten, so a changed patch
rebuilds only what it touches. A build key (sdist, patches, CMake flags,
CPU) names every build.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mc_gguf.errors import RuntimeBuildError

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
# sha256 of the PyPI sdist; it vendors llama.cpp at commit 0c1e570.
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDOR_DIR = "vendor/llama.cpp"
BUILD_INFO_FILE = "mc_gguf_build.json"

# What the wheel needs and nothing more: no multimodal library, no tools,
# examples or tests (stock.tools_dir() builds the few tools benchmarks and tests use);
# ggml's RPC backend (libggml-rpc: client and server, runtime/rpc.py).
BASE_CMAKE_ARGS = (
    "-DGGML_RPC=ON",
    "-DLLAVA_BUILD=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
)


# Patches the stock build gets too: AMX repacking, which crashes on some CPUs that report AMX (upstream
# issue #20824), only when LLAMA_MC_AMX=1.
STOCK_WORKAROUNDS = ("0001-ggml-cpu-AMX-repacking-only-when-LLAMA_MC_AMX-1.patch",)


@dataclass(frozen=True)
class BuildFlags:
    """Which ggml backends to build besides the CPU, and whether to apply the patch series.

    ``stock=True`` builds llama.cpp as the sdist ships it: the reference that
    tests compare the patched runtime with. It is never installed. It gets only
    the patches of STOCK_WORKAROUNDS, which keep upstream faults of this
    machine's CPU from crashing it and change no result.
    """

    cuda: bool = False
    metal: bool = False
    vulkan: bool = False
    cuda_architectures: str | None = None
    stock: bool = False

    def patches(self) -> list[Path]:
        series = patch_series()
        return [p for p in series if p.name in STOCK_WORKAROUNDS] if self.stock else series

    def cmake_args(self) -> list[str]:
        args = list(BASE_CMAKE_ARGS)
        if self.cuda:
            args.append("-DGGML_CUDA=ON")
            if self.cuda_architectures:
                args.append(f"-DCMAKE_CUDA_ARCHITECTURES={self.cuda_architectures}")
        if self.metal:
            args.append("-DGGML_METAL=ON")
        if self.vulkan:
            args.append("-DGGML_VULKAN=ON")
        return args

    def label(self) -> str:
        parts = ["cpu"] + [name for name in ("cuda", "metal", "vulkan") if getattr(self, name)]
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


def run_checked(cmd: list[str], what: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
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
        run_checked(
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
    # inside another git repository (a cache under a checkout) git apply would take the paths as relative to
    # that repository's root and skip every file: git must not look above the tree
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tree)}
    for patch in patches:
        # --check first, so a failing series leaves nothing half-applied in this patch.
        check = subprocess.run(
            ["git", "apply", "--check", "--verbose", str(patch)], cwd=vendor, capture_output=True, text=True, env=env
        )
        if check.returncode != 0:
            failed = [line for line in check.stderr.splitlines() if line.startswith("error:")]
            raise RuntimeBuildError(
                f"patch {patch.name} does not apply to llama.cpp in {SDIST_FILE}: "
                + "; ".join(failed or check.stderr.strip().splitlines()[-3:])
            )
        run_checked(["git", "apply", str(patch)], f"applying {patch.name}", cwd=vendor, env=env)


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


class CacheLock:
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


def patched_source(flags: BuildFlags = BuildFlags()) -> Path:
    """The patched llama.cpp tree (``vendor/llama.cpp``) of the current series, prepared if absent.

    Tests compile programs against the installed runtime with its headers.
    """
    cache = cache_root()
    with CacheLock(cache):
        return current_source(cache, flags) / VENDOR_DIR


def current_source(cache: Path, flags: BuildFlags) -> Path:
    """The sdist tree for ``flags`` at its stable path, prepared again when its build key is stale
    (call under the cache lock)."""
    stable = _source_dir(cache, flags)
    info = stable / "llama_cpp" / BUILD_INFO_FILE
    if not info.exists() or json.loads(info.read_text()).get("build_key") != build_key(flags):
        stable = prepare_source(cache, fetch_sdist(cache), flags)
    return stable
