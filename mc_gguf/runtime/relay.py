"""The relays of a supervised run (supervise.py): one TCP relay on 127.0.0.1 per RPC server, which the child
reaches the server through (rpc.route), forwarding the bytes both ways.

A relay follows ggml-rpc's framing (ggml-rpc.cpp: send_rpc_cmd, the wire as
rpc.py describes it) far enough to know whether the server owes a reply, and
says in one line what went wrong when the server closes or breaks the
connection the child holds, owes a reply and sends no byte of it for
``timeout`` seconds (or takes nothing of a request for as long), or sends
bytes that no request asked for (which it does not pass on). It never closes
the child's side on a fault: the parent ends the child and raises the line
as an ``RpcError``.
"""

from __future__ import annotations

import socket
import threading
import time

from mc_gguf.runtime.rpc import ANSWERED_COMMANDS, parse_endpoint

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


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__
