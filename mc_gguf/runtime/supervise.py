"""Commands given ``--rpc``: llama.cpp's work in a child process, each server behind a relay that watches it.

ggml-rpc's client ends its process with abort() on any broken connection
(ggml-rpc.cpp: RPC_STATUS_ASSERT in rpc_dispatcher::work, GGML_ABORT in
rpc_dispatcher::start) and waits for a reply for ever. No server may do that
to an mc-gguf command, so ``run_supervised`` runs the command again as a
child (``python -m mc_gguf`` with the same arguments, stdin, stdout and
stderr), and this process, the parent, runs one ``Relay`` per server on
127.0.0.1, which the child connects to instead (rpc.route). A relay forwards
the bytes both ways and follows ggml-rpc's framing (rpc.py) far enough to
know whether the server owes a reply. The parent ends the child
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
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack

from mc_gguf.errors import InvalidValueError, McGgufError
from mc_gguf.runtime.rpc import ANSWERED_COMMANDS, RpcError, check_server, parse_endpoint, route

# A healthy server's longest silence is one reply: llama.cpp sends GRAPH_COMPUTE (not answered) and then waits on
# GET_TENSOR for the logits, so a whole micro-batch's forward pass (512 tokens) runs in between; for a 47B MoE on
# a slow CPU that is minutes. Five minutes leaves room for that and still ends a dead peer's run.
DEFAULT_TIMEOUT_S = 300.0
SUPERVISOR_ENV = "MC_GGUF_RPC_SUPERVISOR"  # in the child: {"relays": {server: relay}, "abort_fd": N, "parent": PID}
STOP_GRACE_S = 5.0        # SIGTERM, this long, then SIGKILL
INTERRUPT_GRACE_S = 10.0  # after Ctrl-C, how long the child may take to stop by itself (a second Ctrl-C: none)
_CHUNK = 1 << 20
_REQUEST_HEADER = 9  # | rpc_cmd (1 byte) | request_size (8 bytes) |
_REPLY_HEADER = 8    # | response_size (8 bytes) |


class _Link:
    """One connection of the child through a relay: its socket, the server's, and what the server owes on it."""

    def __init__(self, client: socket.socket, server: socket.socket):
        self.client, self.server = client, server
        self.lock = threading.Lock()
        self.owed = 0                          # answered requests whose reply has not ended
        self.waiting_since = 0.0               # the server's last byte, or the request it first owed since
        self.sending_since: float | None = None  # a forward to the server under way since
        self.client_closed = False             # the child closed its side: what the server does next is no fault
        self._request = bytearray()            # the header of a request, while incomplete
        self._request_left = 0                 # bytes of the current request's data still to come
        self._reply = bytearray()              # the header of a reply, while incomplete
        self._reply_left = 0                   # bytes of the current reply's data still to come

    def requests(self, data: memoryview) -> None:
        """Follow the child's bytes: | rpc_cmd (1 byte) | request_size (8 bytes) | request_data |."""
        owed, i, n = 0, 0, len(data)
        while i < n:
            if self._request_left:
                step = min(self._request_left, n - i)
                self._request_left -= step
                i += step
                continue
            step = min(_REQUEST_HEADER - len(self._request), n - i)
            self._request += data[i:i + step]
            i += step
            if len(self._request) == _REQUEST_HEADER:
                owed += self._request[0] in ANSWERED_COMMANDS
                self._request_left = int.from_bytes(self._request[1:], "little")
                self._request.clear()
        if owed:
            with self.lock:
                if not self.owed:
                    self.waiting_since = time.monotonic()
                self.owed += owed

    def replies(self, data: memoryview) -> bool:
        """Follow the server's bytes: | response_size (8 bytes) | response_data |; False when they begin a reply
        that no request asked for."""
        with self.lock:
            self.waiting_since = time.monotonic()
            i, n = 0, len(data)
            while i < n:
                if self._reply_left:
                    step = min(self._reply_left, n - i)
                    self._reply_left -= step
                    i += step
                    if not self._reply_left:
                        self.owed -= 1  # the reply ended
                    continue
                if not self._reply and not self.owed:
                    return False
                step = min(_REPLY_HEADER - len(self._reply), n - i)
                self._reply += data[i:i + step]
                i += step
                if len(self._reply) == _REPLY_HEADER:
                    self._reply_left = int.from_bytes(self._reply, "little")
                    self._reply.clear()
                    if not self._reply_left:
                        self.owed -= 1  # an empty reply ends with its header
        return True

    def stalled(self, now: float, timeout: float) -> str | None:
        """How the server stopped, when it has for ``timeout`` seconds: owing a reply, or taking no request."""
        with self.lock:
            if self.client_closed:
                return None
            if self.owed and now - self.waiting_since > timeout:
                return "no reply"
            sending = self.sending_since
        if sending is not None and now - sending > timeout:
            return "it took nothing of a request"
        return None


class Relay:
    """A TCP relay on 127.0.0.1 (an ephemeral port) to the RPC server at ``endpoint``, watching each connection.

    ``problem()`` says what went wrong with the server, in one line, or None; ``wake`` is set when something
    does. A relay never closes the child's side on a fault: the child waits until the parent ends it."""

    def __init__(self, endpoint: str, timeout: float, wake: threading.Event):
        self.endpoint, self.timeout, self._wake = endpoint, timeout, wake
        self._server_address = parse_endpoint(endpoint)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.last_reply = 0.0  # when the server last sent a byte
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._sockets: list[socket.socket] = []
        self._problem: str | None = None
        self._closed = False

    def start(self) -> None:
        threading.Thread(target=self._accept, name=f"rpc relay {self.endpoint}", daemon=True).start()

    def problem(self, now: float | None = None) -> str | None:
        with self._lock:
            if self._problem or self._closed:
                return self._problem
            links = list(self._links)
        now = time.monotonic() if now is None else now
        for link in links:
            stalled = link.stalled(now, self.timeout)
            if stalled:
                return (f"the RPC server at {self.endpoint} stopped answering: {stalled} in {self.timeout:g} s "
                        f"(--rpc-timeout)")
        return None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets = [self._listener, *self._sockets]
        for sock in sockets:
            sock.close()

    def _fail(self, message: str) -> None:
        with self._lock:
            if self._closed or self._problem:
                return
            self._problem = message
        self._wake.set()

    def _accept(self) -> None:
        self._listener.settimeout(0.5)
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            client.settimeout(None)
            with self._lock:
                self._sockets.append(client)
            try:
                server = socket.create_connection(self._server_address, timeout=self.timeout)
            except OSError as exc:
                self._fail(f"cannot reach the RPC server at {self.endpoint} ({_reason(exc)})")
                continue
            server.settimeout(None)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as ggml-rpc's own sockets
            link = _Link(client, server)
            with self._lock:
                self._sockets.append(server)
                self._links.append(link)
            threading.Thread(target=self._forward_requests, args=(link,), daemon=True).start()
            threading.Thread(target=self._forward_replies, args=(link,), daemon=True).start()

    def _forward_requests(self, link: _Link) -> None:
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        while True:
            try:
                n = link.client.recv_into(buffer)
            except OSError:
                n = 0
            if not n:  # the child closed its side, or ended: the server sees the end, answers it with its own
                link.client_closed = True
                _shutdown(link.server)
                return
            link.requests(view[:n])
            link.sending_since = time.monotonic()
            try:
                link.server.sendall(view[:n])
            except OSError as exc:
                if not link.client_closed:
                    self._fail(f"the connection to the RPC server at {self.endpoint} failed during the run "
                               f"({_reason(exc)})")
                return
            finally:
                link.sending_since = None

    def _forward_replies(self, link: _Link) -> None:
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        while True:
            try:
                n = link.server.recv_into(buffer)
            except OSError as exc:
                if link.client_closed:
                    self._end(link)
                else:
                    self._fail(f"the connection to the RPC server at {self.endpoint} failed during the run "
                               f"({_reason(exc)})")
                return
            if not n:
                if link.client_closed:
                    self._end(link)  # a connection's normal end: the child's side first
                else:
                    self._fail(f"the RPC server at {self.endpoint} closed the connection during the run (it "
                               "stopped, or refused a request: see its output)")
                return
            self.last_reply = time.monotonic()
            if not link.replies(view[:n]):
                self._fail(f"the RPC server at {self.endpoint} sent a reply this runtime cannot read: bytes that "
                           "no request asked for")
                return
            try:
                link.client.sendall(view[:n])
            except OSError:
                return  # the child went away: how it ended is the parent's to judge

    def _end(self, link: _Link) -> None:
        with self._lock:
            if link in self._links:
                self._links.remove(link)
            for sock in (link.client, link.server):
                if sock in self._sockets:
                    self._sockets.remove(sock)
        link.client.close()
        link.server.close()


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


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


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
