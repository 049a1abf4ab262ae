"""Where an mc-gguf command's memory peaks.

Runs the command in this process (``mc-gguf``'s own entry point) with a thread that samples the process's
anonymous resident memory (RssAnon in /proc/self/status: what the machine must hold, where RSS also counts
the pages of mapped files) every ``--interval`` seconds together with the main thread's stack, and prints one
JSON object: the peak and the mc_gguf frames it was reached in, and for each mc_gguf function that was the
innermost one of a sample, the most memory sampled while it ran, highest first. Linux only (RssAnon).

    python scripts/trace_memory.py [--json OUT] -- compress MODEL --bits 2.5 -o out.gguf

The command's exit status is this script's; its report goes to stdout after the command's own output (and to
``--json``).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import emit_json  # noqa: E402

GIB = 2 ** 30
PACKAGE = os.sep + "mc_gguf" + os.sep


def anonymous_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))


def mc_gguf_frames(frame) -> list[str]:
    """The stack's mc_gguf frames, innermost first, as 'package/path.py:function:line'."""
    names = []
    while frame is not None:
        path = frame.f_code.co_filename
        if PACKAGE in path:
            short = path[path.rindex(PACKAGE) + 1:]
            names.append(f"{short}:{frame.f_code.co_name}:{frame.f_lineno}")
        frame = frame.f_back
    return names


class Tracer:
    """Samples (RssAnon, the main thread's mc_gguf frames) until stopped."""

    def __init__(self, interval: float):
        self.interval, self.main = interval, threading.main_thread().ident
        self.peak, self.peak_stack, self.by_function, self.samples = 0, [], {}, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        used = anonymous_bytes()
        frame = sys._current_frames().get(self.main)
        stack = mc_gguf_frames(frame) if frame is not None else []
        self.samples += 1
        if stack:
            function = stack[0].rsplit(":", 1)[0]
            self.by_function[function] = max(self.by_function.get(function, 0), used)
        if used > self.peak:
            self.peak, self.peak_stack = used, stack

    def __enter__(self) -> Tracer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.sample()

    def report(self, top: int) -> dict:
        ranked = sorted(self.by_function.items(), key=lambda kv: -kv[1])[:top]
        return {"peak_anon_gib": round(self.peak / GIB, 3), "peak_stack": self.peak_stack,
                "samples": self.samples, "interval_s": self.interval,
                "peak_anon_gib_by_function": {name: round(used / GIB, 3) for name, used in ranked}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between samples (default: 0.1)")
    parser.add_argument("--top", type=int, default=12, help="functions listed (default: 12)")
    parser.add_argument("--json", help="also write the JSON here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the mc-gguf command and its arguments, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the mc-gguf command after --, e.g. -- compress MODEL --bits 2.5 -o out.gguf")
    if not os.path.exists("/proc/self/status"):
        parser.error("RssAnon is read from /proc/self/status: Linux only")
    from mc_gguf.cli import main as mc_gguf_main

    sys.argv = ["mc-gguf", *command]
    with Tracer(args.interval) as tracer:
        try:
            status = mc_gguf_main()
        except SystemExit as exit_:
            status = exit_.code
    sys.stdout.flush()
    emit_json({"command": command, "exit_status": status, **tracer.report(args.top)}, args.json)
    return status if isinstance(status, int) else 1


if __name__ == "__main__":
    sys.exit(main())
