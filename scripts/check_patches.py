#!/usr/bin/env python3
"""Check the patch series patch by patch on the pinned sdist: its headers, then a build and the op tests at every step.

``make check-patches`` runs this. The series (patches/*.patch, name order) is
checked as a whole first:

- each header matches its diff: ``[PATCH n/N]`` numbers the patch as the
  series does, and the files its diffstat names are the files the diff
  changes;
- ``#define LLAMA_MC_PATCH_LEVEL`` is added by one patch and changed by none;
- no patch is over MAX_LINES lines, except the one that adds the fused op
  (GGML_OP_MUL_MAT_ID_GROUPS);
- no patch adds a backend name to ggml-backend.cpp (which backends skip -1
  ids is each backend's to say, through its registry's features).

Then the sdist's ``vendor/llama.cpp`` is copied to a work folder and the
patches are applied one at a time by mc_gguf/runtime/source.py's
apply_patches, as the runtime's build applies them. After each one, one CMake build
folder (Release, static, GGML_RPC=ON, tests on; ccache when installed) builds
ggml, llama, test-backend-ops and the series' own tests present at that
step, and runs:

- ``test-backend-ops test -b CPU -o MUL_MAT_ID`` on the cases with skipped
  slots (``skip=1``) and a share of the stock ones, against the CPU's
  reference mode;
- ``test-backend-ops test -b CPU -o MUL_MAT_ID_GROUPS`` once the op exists;
- ``test-mul-mat-id-skip`` and ``test-mul-mat-id-groups`` once they exist.

Prints one JSON object: per patch its lines, the build and each test's result
and seconds. Exit status 0 when every check passes, 1 otherwise, 2 on bad
input. The first run builds everything (tens of minutes on 2 cores); the
build folder is kept (build/check-patches), so a later run rebuilds what the
patches change.

    python scripts/check_patches.py [--patches DIR] [--work build/check-patches] [--keep-going]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mc_gguf.errors import RuntimeBuildError  # noqa: E402
from mc_gguf.runtime.source import SDIST_FILE, VENDOR_DIR, apply_patches, cache_root, fetch_sdist  # noqa: E402
from rebase_check import InputError, parse_patch  # noqa: E402

MAX_LINES = 500
FUSED_OP = "GGML_OP_MUL_MAT_ID_GROUPS"
# names ggml's backends register under (ggml_backend_reg_name): a string literal of one of them added to the
# generic ggml-backend.cpp is a list of backends that the backends' own registries should answer for
BACKEND_NAMES = ("CPU", "CUDA", "ROCm", "MUSA", "MTL", "Metal", "RPC", "Vulkan", "SYCL", "OpenCL", "CANN", "WebGPU")
# the MUL_MAT_ID cases of test-backend-ops run at each step: every case with skipped slots, and the stock
# cases of 4 experts, 512 x 256 (every type; mat-vec and matrix-matrix paths)
MUL_MAT_ID_CASES = r"skip=1|n_mats=4,n_used=2,b=0,m=512,n=(1|32),k=256"
OWN_TESTS = ("test-mul-mat-id-skip", "test-mul-mat-id-groups")
TIMEOUT = 3600


@dataclass
class Step:
    name: str
    lines: int
    applied: bool = False
    built: bool = False
    build_seconds: float = 0.0
    tests: dict = field(default_factory=dict)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.applied and self.built and all(t["passed"] for t in self.tests.values())


def stat_files(text: str) -> list[str]:
    """The paths of the diffstat between the header's '---' and the first diff (git may shorten a long
    path to '.../tail')."""
    head = text.split("\ndiff --git ", 1)[0]
    _, _, stat = head.partition("\n---\n")
    return [m.group(1).strip() for m in re.finditer(r"^\s+(\S.*?)\s+\|\s+(?:\d+|Bin)", stat, re.M)]


def header_problems(series: list[Path]) -> list[str]:
    """What is wrong with the series as a whole, one line each."""
    problems = []
    level_defined = []
    for n, patch in enumerate(series, 1):
        text = patch.read_text()
        subject = re.search(r"^Subject: \[PATCH (\d+)/(\d+)\]", text, re.M)
        if not subject or (int(subject.group(1)), int(subject.group(2))) != (n, len(series)):
            problems.append(f"{patch.name}: the subject does not say [PATCH {n}/{len(series)}]")
        try:
            files = [f.path for f in parse_patch(patch).files]
        except InputError as e:
            problems.append(str(e))
            files = []
        stat = stat_files(text)
        unmatched = [s for s in stat if not any(f == s or (s.startswith("...") and f.endswith(s[3:]))
                                                for f in files)]
        if len(stat) != len(files) or unmatched:
            problems.append(f"{patch.name}: the diffstat names {len(stat)} files, the diff changes {len(files)}"
                            + (f" (not in the diff: {', '.join(unmatched)})" if unmatched else ""))
        if re.search(r"^\+\s*#define LLAMA_MC_PATCH_LEVEL\b", text, re.M):
            level_defined.append(patch.name)
        if re.search(r"^-\s*#define LLAMA_MC_PATCH_LEVEL\b", text, re.M):
            problems.append(f"{patch.name}: changes LLAMA_MC_PATCH_LEVEL (define it once)")
        lines = text.count("\n")
        if lines > MAX_LINES and not re.search(rf"^\+\s*{FUSED_OP},", text, re.M):
            problems.append(f"{patch.name}: {lines} lines (at most {MAX_LINES}, except the fused op's patch)")
        backend_diff = re.search(r"^diff --git a/ggml/src/ggml-backend.cpp .*?(?=^diff --git |\Z)", text, re.M | re.S)
        if backend_diff:
            added = [line for line in backend_diff.group(0).splitlines() if line.startswith("+")]
            named = [name for name in BACKEND_NAMES if any(f'"{name}"' in line for line in added)]
            if named:
                problems.append(f"{patch.name}: names backends in ggml-backend.cpp ({', '.join(named)})")
    if len(level_defined) != 1:
        problems.append(f"LLAMA_MC_PATCH_LEVEL is defined by {len(level_defined)} patches "
                        f"({', '.join(level_defined) or 'none'}), not one")
    return problems


def run(cmd: list, log, cwd: Path | None = None, timeout: int = TIMEOUT) -> tuple[bool, float, str]:
    start = time.monotonic()
    try:
        result = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)
        output, ok = result.stdout + result.stderr, result.returncode == 0
    except subprocess.TimeoutExpired as e:
        output, ok = f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout} s", False
    log.write(f"$ {' '.join(str(c) for c in cmd)}\n{output}\n")
    log.flush()
    return ok, time.monotonic() - start, output


def configure(source: Path, build: Path, log) -> None:
    cmd = ["cmake", "-S", source, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
           "-DGGML_RPC=ON", "-DLLAMA_BUILD_TESTS=ON", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
           "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF"]
    if shutil.which("ninja"):
        cmd += ["-G", "Ninja"]
    if shutil.which("ccache"):
        cmd += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
    ok, _, output = run(cmd, log)
    if not ok:
        raise SystemExit(f"error: configuring llama.cpp failed:\n{output[-3000:]}")


def check_step(step: Step, source: Path, build: Path, log) -> None:
    has_groups = FUSED_OP in (source / "ggml" / "include" / "ggml.h").read_text()
    own = [t for t in OWN_TESTS if f"{t}.cpp" in (source / "tests" / "CMakeLists.txt").read_text()]
    # a new test in tests/CMakeLists.txt needs CMake to run again; ninja does that by itself
    targets = ["ggml", "llama", "test-backend-ops", *own]
    ok, seconds, output = run(["cmake", "--build", build, "--parallel", os.cpu_count() or 1, "--target", *targets], log)
    step.built, step.build_seconds = ok, round(seconds, 1)
    if not ok:
        step.error = "\n".join(line for line in output.splitlines() if "error" in line.lower())[-2000:]
        return
    bin_dir = build / "bin"
    checks = {"test-backend-ops MUL_MAT_ID": [bin_dir / "test-backend-ops", "test", "-b", "CPU", "-o", "MUL_MAT_ID",
                                              "-p", MUL_MAT_ID_CASES]}
    if has_groups:
        checks["test-backend-ops MUL_MAT_ID_GROUPS"] = [bin_dir / "test-backend-ops", "test", "-b", "CPU", "-o",
                                                        "MUL_MAT_ID_GROUPS"]
    for name in own:
        checks[name] = [bin_dir / name]
    for name, cmd in checks.items():
        passed, seconds, output = run(cmd, log)
        result = {"passed": passed, "seconds": round(seconds, 1)}
        if name.startswith("test-backend-ops"):
            # test-backend-ops passes when no case matches: each of its checks must have run some
            counts = re.search(r"(\d+)/(\d+) tests passed", output)
            result["cases"] = int(counts.group(2)) if counts else 0
            result["passed"] = passed and result["cases"] > 0
        if not result["passed"]:
            result["tail"] = output[-1500:]
        step.tests[name] = result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", type=Path, default=REPO / "patches", help="the series (default: patches/)")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "check-patches",
                        help="work folder: the patched tree and the CMake build folder, kept between runs")
    parser.add_argument("--keep-going", action="store_true", help="build and test the later patches after a failure")
    args = parser.parse_args()

    series = sorted(args.patches.glob("*.patch"))
    if not series:
        print(f"error: no *.patch in {args.patches}", file=sys.stderr)
        return 2
    problems = header_problems(series)

    args.work.mkdir(parents=True, exist_ok=True)
    # the sdist's layout (apply_patches works on it), holding only vendor/llama.cpp
    root, build = args.work / SDIST_FILE.removesuffix(".tar.gz"), args.work / "build"
    source = root / VENDOR_DIR
    # a fresh copy of the pinned tree; the build folder stays, so ccache and CMake reuse what they can
    shutil.rmtree(root, ignore_errors=True)
    with tarfile.open(fetch_sdist(cache_root())) as archive:
        prefix = f"{root.name}/{VENDOR_DIR}/"
        archive.extractall(args.work, members=[m for m in archive.getmembers() if m.name.startswith(prefix)],
                           filter="tar")
    (source / ".git").unlink(missing_ok=True)  # the sdist's submodule pointer: the tree is not a repository
    # the archive's old modification times would look older than the objects of a previous run's later step:
    # every file is new to the build (ccache still finds what was compiled before)
    now = time.time()
    for path in source.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.utime(path, (now, now))

    steps = []
    with open(args.work / "check.log", "w") as log:
        configure(source, build, log)
        for patch in series:
            step = Step(patch.name, patch.read_text().count("\n"))
            steps.append(step)
            print(f"[{len(steps)}/{len(series)}] {patch.name} ...", file=sys.stderr, flush=True)
            try:
                apply_patches(root, [patch.resolve()])
                step.applied = True
            except RuntimeBuildError as e:
                step.error = str(e)
            if step.applied:
                check_step(step, source, build, log)
            print(f"    {'ok' if step.ok else 'FAILED'} (build {step.build_seconds} s; "
                  + ", ".join(f"{k}: {'ok' if v['passed'] else 'FAILED'}" for k, v in step.tests.items()) + ")",
                  file=sys.stderr, flush=True)
            if not step.ok and not args.keep_going:
                break

    report = {
        "sdist": SDIST_FILE,
        "patches": len(series),
        "header_problems": problems,
        "steps": [{**asdict(s), "ok": s.ok} for s in steps],
        "passed": not problems and len(steps) == len(series) and all(s.ok for s in steps),
        "log": str(args.work / "check.log"),
    }
    print(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
