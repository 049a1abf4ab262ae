"""mc-gguf demo: the offline demo `make demo` runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from mc_gguf.cli.common import add_command


def add_parser(commands) -> None:
    p = add_command(commands, "demo", "Build a tiny seeded Mixtral, convert it and generate from it: the whole "
                    "pipeline offline, in about a minute.", "example: mc-gguf demo --workdir build/demo")
    p.add_argument("--workdir", default="build/demo", help="where the demo's model and GGUF go (default: build/demo)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from mc_gguf.demo import run_demo

    run_demo(Path(args.workdir))
