"""Commands given ``--rpc``: llama.cpp's work in a child process, each server behind a relay that watches it.

ggml-rpc's client ends its process with abort() on any broken connection
(ggml-rpc.cpp: RPC_STATUS_ASSERT in rpc_dispatcher::work, GGML_ABORT in
rpc_dispatcher::start) and waits for a reply for ever. No server may do that
to an mc-gguf command, so ``run_supervised`` runs the command again as a
child (``python -m mc_gguf`` with the same arguments, stdin, stdout and
stderr), and this process, the parent, runs one ``Relay`` per server on
127.0.0.1 (relay.py), which the child connects to instead (rpc.route). A
relay forwards the bytes both ways and follows ggml-rpc's framing (rpc.py)
far enough to know whether the server owes a reply. The parent ends the child
(SIGTERM, then SIGKILL) and raises one ``RpcError`` when a server

- closes the connection, or the connection fails, while the child holds it;
- owes a reply and sends no byte of it for ``timeout`` seconds, or takes
  nothing of a request for as long;
- sends bytes that no request asked for (the relay does not pass them on).

A child that aborts anyway (a reply of the wrong size) hands ggml's message
to the parent through a pipe (ggml_set_abort_callback) instead of printing it
and a backtrace, and the parent turns it into the same kind of line. A child
that exits gives its own exit status. Ctrl-C reaches the child (the same
process group), which stops as the CLI does (130).

``mc_gguf.loader.model.load(rpc=...)`` called directly has none of this:
ggml-rpc may still abort that process.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack

from mc_gguf.errors import InvalidValueError, McGgufError
from mc_gguf.runtime.relay import Relay
from mc_gguf.runtime.rpc import RpcError, check_server, route

# A healthy server's longest silence is one reply: llama.cpp sends GRAPH_COMPUTE (not answered) and then waits on
# GET_TENSOR for the logits, so a whole micro-batch's forward pass (512 tokens) runs in between; for a 47B MoE on
# a slow CPU that is minutes. Five minutes leaves room for that and still ends a dead peer's run.
DEFAULT_TIMEOUT_S = 300.0
SUPERVISOR_ENV = "MC_GGUF_RPC_SUPERVISOR"  # in the child: {"relays": {server: relay}, "abort_fd": N, "parent": PID}
STOP_GRACE_S = 5.0        # SIGTERM, this long, then SIGKILL
INTERRUPT_GRACE_S = 10.0  # after Ctrl-C, how long the child may take to stop by itself (a second Ctrl-C: none)


def run_supervised(argv: Sequence[str], endpoints: Sequence[str], timeout: float = DEFAULT_TIMEOUT_S,
                   debug: bool = False) -> int:
    """Run the mc-gguf command ``argv`` (whose --rpc servers are ``endpoints``) in a child process, through one
    relay per server: the child's exit status, or one RpcError (McGgufError) when a server or the runtime ended
    the run. ``timeout``: seconds a server may owe a reply without sending a byte of it."""
    if not (math.isfinite(timeout) and timeout > 0):
        raise InvalidValueError(f"--rpc-timeout {timeout} is not a positive number of seconds")
    endpoints = list(dict.fromkeys(endpoints))
    for endpoint in endpoints:
        check_server(endpoint, min(timeout, 10.0))  # here, so that a refusal names the server and not its relay
    with ExitStack() as stack:
        wake = threading.Event()
        relays = []
        for endpoint in endpoints:
            relays.append(Relay(endpoint, timeout, wake))
            stack.callback(relays[-1].close)
        read_fd, write_fd = os.pipe()
        stack.callback(os.close, read_fd)
        env = dict(os.environ)
        env[SUPERVISOR_ENV] = json.dumps({"relays": {r.endpoint: r.address for r in relays}, "abort_fd": write_fd,
                                          "parent": os.getpid()})
        if debug:
            env["MC_GGUF_DEBUG"] = "1"
        try:
            child = subprocess.Popen([sys.executable, "-m", "mc_gguf", *argv], env=env, pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        stack.callback(_stop, child)
        for relay in relays:
            relay.start()
        code = _watch(child, relays, wake)
        if code >= 0:
            return code
        raise _ended_by_signal(-code, relays, _read_all(read_fd))


def _watch(child: subprocess.Popen, relays: list[Relay], wake: threading.Event) -> int:
    """Wait for the child, ending it on a relay's problem (raised) or a Ctrl-C it does not stop at."""
    interrupts: list[float] = []
    handles_sigint = threading.current_thread() is threading.main_thread()
    if handles_sigint:  # the child has Ctrl-C too (the same process group): wait for it to stop
        previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupts.append(time.monotonic()))
    try:
        while child.poll() is None:
            problem = next((p for p in (relay.problem() for relay in relays) if p), None)
            if problem:
                _stop(child)
                if child.returncode >= 0:
                    return child.returncode  # it ended by itself first, and said why
                raise RpcError(problem)
            if interrupts and (len(interrupts) > 1 or time.monotonic() - interrupts[0] > INTERRUPT_GRACE_S):
                _stop(child)
                raise KeyboardInterrupt
            wake.wait(0.1)
            wake.clear()
    finally:
        if handles_sigint:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
    return child.returncode


def _ended_by_signal(signum: int, relays: list[Relay], abort_message: str) -> McGgufError:
    """One line for a child that a signal ended: what a relay saw, else what ggml's abort said."""
    problem = next((p for p in (relay.problem() for relay in relays) if p), None)
    if problem:
        return RpcError(problem)
    detail = re.sub(r"^\S*/", "", abort_message.strip().splitlines()[0]) if abort_message.strip() else ""
    if signum == signal.SIGABRT and relays and ("ggml-rpc" in detail or "RPC" in detail):
        relay = max(relays, key=lambda r: r.last_reply)
        return RpcError(f"the RPC connection to {relay.endpoint} broke: the server sent a reply this runtime "
                        f"cannot read (llama.cpp: {detail})")
    if signum == signal.SIGABRT:
        return McGgufError(f"llama.cpp aborted the run: {detail}" if detail else "llama.cpp aborted the run")
    return McGgufError(f"the run was ended by {signal.Signals(signum).name}")


def _stop(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _read_all(fd: int) -> str:
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
    except BlockingIOError:
        pass
    return data.decode(errors="replace")


# The child's side.

_abort_callback = None  # kept alive while ggml holds it


def supervised_child(debug: bool = False) -> bool:
    """True in a child of ``run_supervised``, made ready: its servers reached through the parent's relays
    (rpc.route), SIGTERM ending it at once, it ending with its parent, ggml's aborts reported to the parent (with
    ``debug`` also printed with a backtrace, as ggml does). False in any other process."""
    setup = os.environ.pop(SUPERVISOR_ENV, None)
    if setup is None:
        return False
    setup = json.loads(setup)
    for endpoint, address in setup["relays"].items():
        route(endpoint, address)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's SIGTERM: nothing to clean up, nothing to say
    _end_with_parent(setup["parent"])
    _report_aborts(setup["abort_fd"], echo=debug)
    return True


def _end_with_parent(parent: int) -> None:
    """Linux: SIGKILL when the parent ends (prctl PR_SET_PDEATHSIG), so that a child whose relays are gone does
    not stay on the terminal."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG (linux/prctl.h)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def _report_aborts(fd: int, echo: bool = False) -> None:
    """ggml_abort's message goes to ``fd`` (the parent) instead of stderr with a backtrace (ggml.c:
    ggml_set_abort_callback), or, with ``echo``, to both; abort() follows as before."""
    global _abort_callback
    from mc_gguf.runtime.build import installed_library_dir, loaded_library

    lib_dir = installed_library_dir()
    path = loaded_library(lib_dir, "ggml-base") if lib_dir else None
    if path is None:
        return  # no runtime: the command says so itself
    callback_type = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
    try:
        ggml = ctypes.CDLL(str(path))
        ggml.ggml_set_abort_callback.restype = ctypes.c_void_p
        ggml.ggml_set_abort_callback.argtypes = [callback_type]
    except (OSError, AttributeError):
        return
    backtrace = getattr(ggml, "ggml_print_backtrace", None) if echo else None

    def report(message: bytes | None) -> None:
        try:
            os.write(fd, (message or b"")[:4096] + b"\n")
            if echo:  # what ggml_abort prints without a callback
                os.write(2, (message or b"") + b"\n")
                if backtrace is not None:
                    backtrace()
        except OSError:
            pass

    _abort_callback = callback_type(report)
    ggml.ggml_set_abort_callback(_abort_callback)
