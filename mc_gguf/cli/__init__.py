"""The ``mc-gguf`` command line: a thin shell over the library, one module per command (or small group).

Building the parser imports only argparse and the light modules that hold
defaults (settings, plan layouts, cost exponents, the type registry): torch,
transformers, scipy and gguf-py are imported by a command when it runs, so
``mc-gguf --help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys

from mc_gguf import __version__
from mc_gguf.cli import (
    allocate,
    calibrate,
    compress,
    convert,
    demo,
    evaluate,
    generate,
    inspect,
    prune,
    quantize,
    runtime,
)
from mc_gguf.errors import McGgufError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mc-gguf",
        description="Mixture Compressor for Mixture-of-Experts LLMs: convert, compress and run them as GGUF in llama.cpp.",
    )
    parser.add_argument("--version", action="version", version=f"mc-gguf {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # in the order --help lists them
    convert.add_parser(commands)
    runtime.add_parser(commands)
    generate.add_parsers(commands)
    prune.add_parser(commands)
    calibrate.add_parser(commands)
    allocate.add_parsers(commands)
    quantize.add_parser(commands)
    compress.add_parser(commands)
    inspect.add_parser(commands)
    allocate.add_show_parser(commands)
    evaluate.add_parser(commands)
    demo.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except McGgufError as exc:
        print(f"mc-gguf: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mc-gguf: interrupted", file=sys.stderr)
        return 130
    return 0
