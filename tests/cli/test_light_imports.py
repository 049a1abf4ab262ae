"""The command line answers --help, --version and inspect without importing the heavy libraries."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "scipy")


def imported_after(code: str) -> set[str]:
    """The top-level modules a fresh interpreter holds after running ``code``."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_building_the_parser_imports_no_heavy_library():
    modules = imported_after("from mc_gguf.cli import build_parser\nbuild_parser()")
    assert not modules & {*HEAVY, "gguf", "numpy"}, modules & {*HEAVY, "gguf", "numpy"}


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["calibrate", "--help"], ["compress", "--help"],
                                  ["allocate", "--help"], ["eval", "--help"], ["bench", "--help"]])
def test_help_and_version_import_no_heavy_library(argv):
    code = ("import sys\nfrom mc_gguf.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit as exit:\n    assert exit.code == 0, exit.code")
    modules = imported_after(code)
    assert not modules & {*HEAVY, "gguf"}, modules & {*HEAVY, "gguf"}


def test_inspect_imports_neither_torch_nor_transformers(converted):
    code = f"from mc_gguf.cli import main\nassert main(['inspect', {str(converted('q8_0'))!r}]) == 0"
    modules = imported_after(code)
    assert not modules & set(HEAVY), modules & set(HEAVY)


def test_every_stage_package_imports_without_heavy_libraries():
    """Importing a stage package (for its settings or its verb's name) costs nothing until the verb is used."""
    packages = ["calibrate", "allocate", "quantize", "prune", "evaluate", "gguf_io", "hf", "ggml", "runtime"]
    modules = imported_after("\n".join(f"import mc_gguf.{p}" for p in packages))
    assert not modules & {*HEAVY, "gguf"}, modules & {*HEAVY, "gguf"}


def test_python_dash_m_mc_gguf_is_the_command():
    result = subprocess.run([sys.executable, "-m", "mc_gguf", "--version"], capture_output=True, text=True,
                            check=False)
    command = subprocess.run([sys.executable, "-m", "mc_gguf.cli", "--version"], capture_output=True, text=True,
                             check=False)
    assert result.returncode == 0 and result.stdout == command.stdout and "mc-gguf" in result.stdout
