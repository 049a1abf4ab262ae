"""scripts/rebase_check.py: the patch series applies, patch by patch, to the sdist it was made against, and a
tree changed under a patch is reported as a conflict at that patch's file and hunk, not as applied."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from mc_gguf.runtime.source import SDIST_FILE, cache_root, patch_series

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "rebase_check.py"
SDIST = cache_root() / "sdist" / SDIST_FILE

pytestmark = pytest.mark.skipif(not SDIST.is_file(), reason="the pinned sdist is fetched by `make runtime`")


def check(*args: str) -> tuple[int, dict]:
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def test_every_patch_applies_clean_to_the_pinned_sdist():
    code, report = check(str(SDIST))
    assert code == 0
    assert [p["name"] for p in report["patches"]] == [p.name for p in patch_series()]
    assert {p["status"] for p in report["patches"]} == {"clean"}


def test_a_changed_file_is_a_conflict_of_the_patch_that_edits_it(tmp_path):
    with tarfile.open(SDIST) as sdist:
        root = sdist.getnames()[0].split("/")[0]
        members = [m for m in sdist.getmembers() if m.name.startswith(f"{root}/vendor/llama.cpp/")]
        sdist.extractall(tmp_path, members=members, filter="data")
    tree = tmp_path / root / "vendor" / "llama.cpp"
    # the first patch's first file, its first changed line's context rewritten
    first = patch_series()[0]
    target = next(line.split(" b/", 1)[1] for line in first.read_text().splitlines() if line.startswith("diff --git"))
    source = tree / target
    source.write_text("\n".join(f"{line} /* changed upstream */" for line in source.read_text().splitlines()))
    code, report = check(str(tree))
    assert code == 1
    failed = report["patches"][0]
    assert failed["name"] == first.name and failed["status"] == "conflicts"
    assert target in json.dumps(failed["conflicts"])
    assert sum(p["status"] == "conflicts" for p in report["patches"]) >= 1
