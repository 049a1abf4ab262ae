"""The ``mc-gguf`` command line: a thin shell over the library, one module per command (or small group).

Building the parser imports only argparse and the light modules that hold
defaults (settings, plan layouts, cost exponents, the type registry): torch,
transformers, scipy and gguf-py are imported by a command when it runs, so
``mc-gguf --help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback

from mc_gguf import __version__
from mc_gguf.cli import (
    allocate,
    bench,
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
    serve,
)
from mc_gguf.cli.common import CommandParser
from mc_gguf.errors import McGgufError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mc-gguf",
        description="Mixture Compressor for Mixture-of-Experts LLMs: convert, compress and run them as GGUF in llama.cpp.",
    )
    parser.add_argument("--version", action="version", version=f"mc-gguf {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or MC_GGUF_DEBUG=1)")
    # each command reports its own usage errors, with its own usage (common.CommandParser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    # in the order --help lists them
    convert.add_parser(commands)
    runtime.add_parser(commands)
    generate.add_parsers(commands)
    serve.add_parser(commands)
    prune.add_parser(commands)
    calibrate.add_parser(commands)
    allocate.add_parsers(commands)
    quantize.add_tuned_errors_parser(commands)
    quantize.add_parser(commands)
    compress.add_parser(commands)
    inspect.add_parser(commands)
    allocate.add_show_parser(commands)
    evaluate.add_parser(commands)
    bench.add_parser(commands)
    demo.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure ends in one line on stderr and a non-zero exit.

    ``--debug`` (or MC_GGUF_DEBUG=1) shows the traceback as well.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("MC_GGUF_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    previous = signal.signal(signal.SIGTERM, _interrupt)  # kill PID: clean up as Ctrl-C does
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "rpc", None):
            code = _supervise_rpc(args, argv, debug)
            if code is not None:
                return code
        args.func(args)
    except KeyboardInterrupt:
        print("mc-gguf: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # argparse's usage errors and --help
        return exc.code if isinstance(exc.code, int) else 1
    except BrokenPipeError:
        # the reader went away (`mc-gguf inspect --json | head -1`): as a Unix tool, stop quietly; stdout is
        # pointed at /dev/null so that the interpreter's own flush at exit does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except BaseException as exc:  # noqa: BLE001 - every failure becomes one line
        print(f"mc-gguf: error: {describe_error(exc)}", file=sys.stderr)
        if debug:
            traceback.print_exception(exc)
        elif not isinstance(exc, (McGgufError, OSError)):
            print("mc-gguf: this is a bug in mc-gguf; run again with --debug for the traceback and report it",
                  file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _supervise_rpc(args: argparse.Namespace, argv: list[str], debug: bool) -> int | None:
    """A command given --rpc runs in a child process that reaches its servers through relays
    (runtime/supervise.py), so that no server can abort or hang it: here, the child's exit status; in the child,
    None."""
    from mc_gguf.runtime.supervise import run_supervised, supervised_child

    if supervised_child(debug):
        return None
    return run_supervised(argv, args.rpc, args.rpc_timeout, debug=debug)


def describe_error(exc: BaseException) -> str:
    """One line for a user: mc-gguf's own message, the operating system's, or the exception's."""
    if isinstance(exc, McGgufError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
