"""mc-gguf inspect: the tensor types of any GGUF, expert by expert, and its mc.* metadata with each key's meaning."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mc_gguf.cli.common import add_command
from mc_gguf.errors import McGgufError

EXAMPLE = ("example: mc-gguf inspect mixtral-mc2.5.gguf\n"
           "         mc-gguf inspect any-model.gguf --json > info.json")


def add_parser(commands) -> None:
    p = add_command(commands, "inspect", "Show the tensor types of any GGUF, expert by expert, and its mc.* "
                    "metadata.", EXAMPLE)
    p.add_argument("gguf", help="a GGUF file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", help="write a heat map of the experts' bits per weight to this PNG")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import json

    from mc_gguf.atomic import check_output_path
    from mc_gguf.gguf_io.inspect import describe, inspect_gguf

    if args.plot:
        check_output_path(args.plot)
    info = inspect_gguf(args.gguf)
    print(json.dumps(info, indent=1) if args.json else describe(info))
    if args.plot:
        if not info["experts"]:
            raise McGgufError(f"{args.gguf} has no experts to plot")
        from mc_gguf.allocate.show import plan_of, plot_plan

        plot_plan(plan_of(info), args.plot, title=Path(args.gguf).name)
        print(f"wrote {args.plot}", file=sys.stderr)
