"""ggml's RPC backend: lend this machine's CPU to llama.cpp clients, and run models on such servers.

The runtime is built with ``GGML_RPC`` on (source.BASE_CMAKE_ARGS), so its
``libggml-rpc`` holds both sides. ``serve`` does what llama.cpp's
``tools/rpc/rpc-server.cpp`` does: ``ggml_backend_rpc_start_server`` with the
CPU device. ``add_servers`` does what llama.cpp's ``--rpc`` does
(common/arg.cpp): ``ggml_backend_rpc_add_server`` per endpoint and every
device of it registered, so that llama.cpp offloads layers to them.

Patch 0005 makes the series speak RPC protocol major 107, so a patched
client and a stock ``rpc-server`` (which would read -1 expert ids as
indices and does not know MUL_MAT_ID_GROUPS) refuse each other. ggml-rpc's
own client aborts the process on that refusal (negotiate_hello,
GGML_ABORT), so ``add_servers`` first asks each server its version itself,
with the same HELLO message, and refuses a stranger with a clear error.

The wire (ggml-rpc.cpp, send_rpc_cmd): a request is | rpc_cmd (1 byte) |
request_size (8 bytes, little-endian) | request_data |; a reply, sent only
for the commands that have one (``RPC_COMMANDS``), is | response_size
(8 bytes) | response_data |. ggml-rpc's client aborts its process on any
broken connection and waits for a reply for ever: runtime/supervise.py keeps
the mc-gguf commands out of both.
"""

from __future__ import annotations

import ctypes
import signal
import socket
import struct
from pathlib import Path

from mc_gguf.errors import McGgufError, RuntimeMissingError

# ggml-rpc.h of the patched tree (patch 0005); a test reads it from there.
PROTOCOL_MAJOR = 107
RPC_CMD_HELLO = 14       # ggml-rpc.cpp: enum rpc_cmd, "must be always 14"
RPC_CONN_CAPS_SIZE = 24  # ggml-rpc/transport.h
GGML_BACKEND_DEVICE_TYPE_CPU = 0  # ggml-backend.h: enum ggml_backend_dev_type

# ggml-rpc.cpp's enum rpc_cmd in its order, and whether rpc_serve_client answers the command (send_msg): the
# client sends the others with send_rpc_cmd's overload that reads no response. HELLO is answered once, first.
RPC_COMMANDS = (
    ("ALLOC_BUFFER", True), ("GET_ALIGNMENT", True), ("GET_MAX_SIZE", True), ("BUFFER_GET_BASE", True),
    ("FREE_BUFFER", False), ("BUFFER_CLEAR", False), ("SET_TENSOR", False), ("SET_TENSOR_HASH", True),
    ("GET_TENSOR", True), ("COPY_TENSOR", True), ("GRAPH_COMPUTE", False), ("GET_DEVICE_MEMORY", True),
    ("INIT_TENSOR", False), ("GET_ALLOC_SIZE", True), ("HELLO", True), ("DEVICE_COUNT", True),
    ("GRAPH_RECOMPUTE", False), ("MEMSET_TENSOR", False),
)
ANSWERED_COMMANDS = frozenset(code for code, (_, answered) in enumerate(RPC_COMMANDS) if answered)

_registered: set[str] = set()
_routes: dict[str, str] = {}  # endpoint -> the address this process connects to for it (route)


class RpcError(McGgufError):
    """An RPC server cannot be reached, or is not one the patched runtime may use."""


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), or a clear error."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RpcError(f"{endpoint!r} is not HOST:PORT (e.g. 127.0.0.1:50052)")
    return host.strip("[]"), int(port)


def route(endpoint: str, address: str) -> None:
    """Reach the server ``endpoint`` at ``address`` (``HOST:PORT``) from now on in this process: runtime/supervise.py's
    relay for it. Messages and llama.cpp's registry still name ``endpoint``."""
    parse_endpoint(address)
    _routes[endpoint] = address


def server_version(endpoint: str, timeout: float = 10.0) -> tuple[int, int, int]:
    """The RPC protocol version a server speaks, asked as ggml-rpc's client asks it (negotiate_hello:
    | cmd (1 byte) | size (8 bytes) | rpc_msg_hello_req |, answered | size | major minor patch pad caps |)."""
    parse_endpoint(endpoint)
    host, port = parse_endpoint(_routes.get(endpoint, endpoint))
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise RpcError(f"cannot reach an RPC server at {endpoint} ({exc})") from None
    try:
        with sock:
            sock.sendall(bytes([RPC_CMD_HELLO]) + struct.pack("<Q", RPC_CONN_CAPS_SIZE) + bytes(RPC_CONN_CAPS_SIZE))
            size = struct.unpack("<Q", _receive(sock, 8, endpoint))[0]
            if size != 4 + RPC_CONN_CAPS_SIZE:
                raise RpcError(f"the RPC server at {endpoint} answered the handshake with {size} bytes: it speaks "
                               f"another protocol than this runtime (major {PROTOCOL_MAJOR})")
            major, minor, patch = _receive(sock, size, endpoint)[:3]
    except TimeoutError:
        raise RpcError(f"the RPC server at {endpoint} did not answer the handshake in {timeout:g} s") from None
    except OSError as exc:
        raise RpcError(f"the connection to the RPC server at {endpoint} failed during the handshake ({exc})") from None
    return major, minor, patch


def _receive(sock: socket.socket, n: int, endpoint: str) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise RpcError(f"the RPC server at {endpoint} closed the connection during the handshake: it speaks "
                           f"another protocol than this runtime (major {PROTOCOL_MAJOR}); start `mc-gguf runtime "
                           "rpc-server` there")
        data += chunk
    return data


def check_server(endpoint: str, timeout: float = 10.0) -> None:
    """A clear error unless ``endpoint`` is a patched rpc-server of this series (answering within ``timeout``)."""
    major, minor, patch = server_version(endpoint, timeout)
    if major != PROTOCOL_MAJOR:
        raise RpcError(f"the RPC server at {endpoint} speaks protocol {major}.{minor}.{patch}, a stock llama.cpp "
                       f"rpc-server: it would read skipped expert slots (-1) as experts. Start `mc-gguf runtime "
                       f"rpc-server` there (protocol {PROTOCOL_MAJOR})")


def _libraries(lib_dir: Path | None = None) -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """libggml and libggml-rpc of the installed runtime (or of ``lib_dir``), the very instances libllama uses:
    devices registered in another copy of libggml would be invisible to llama.cpp."""
    from mc_gguf.runtime.build import installed_library_dir, loaded_library

    lib_dir = lib_dir or installed_library_dir()
    paths = [loaded_library(lib_dir, name) if lib_dir else None for name in ("ggml", "ggml-rpc")]
    if None in paths:
        raise RuntimeMissingError("the installed llama_cpp has no RPC backend (libggml-rpc): rebuild it with "
                                  "`mc-gguf runtime build`")
    ggml, rpc = (ctypes.CDLL(str(p)) for p in paths)
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    ggml.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    ggml.ggml_backend_device_register.restype = None
    ggml.ggml_backend_device_register.argtypes = [ctypes.c_void_p]
    rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    rpc.ggml_backend_rpc_start_server.restype = None
    rpc.ggml_backend_rpc_start_server.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                                                  ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]
    return ggml, rpc


def add_servers(endpoints: list[str]) -> None:
    """Make the patched rpc-servers at ``endpoints`` llama.cpp devices of this process (once each).

    From then on ggml-rpc's client aborts this process when a server breaks the connection or answers what it
    cannot read, and waits for ever on one that stops answering. The mc-gguf commands therefore run it in a child
    process behind relays that end it with one clear error instead (runtime/supervise.py: ``run_supervised`` runs
    an mc-gguf command so); a library caller that needs as much calls this in a process it can lose."""
    ggml, rpc = _libraries()
    for endpoint in endpoints:
        if endpoint in _registered:
            continue
        check_server(endpoint)
        reg = rpc.ggml_backend_rpc_add_server(_routes.get(endpoint, endpoint).encode())
        if not reg:
            raise RpcError(f"llama.cpp could not add the RPC server at {endpoint}")
        for i in range(ggml.ggml_backend_reg_dev_count(reg)):
            ggml.ggml_backend_device_register(ggml.ggml_backend_reg_dev_get(reg, i))
        _registered.add(endpoint)


def check_listen(host: str, port: int) -> None:
    """A clear error unless ``host``:``port`` can be listened on now (ggml-rpc only prints "Failed to create server
    socket" and returns): a host with a port in it, an unknown host, a port in use or not allowed."""
    if not host or ":" in host.strip("[]") and not _is_ipv6(host.strip("[]")):
        raise RpcError(f"--host {host!r}: give an address or host name alone; the port goes in --port")
    if not 0 < port < 65536:
        raise RpcError(f"--port {port} is not a TCP port (1-65535)")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise RpcError(f"cannot listen on {host}:{port}: unknown host ({exc})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ggml-rpc's own socket
        try:
            probe.bind(address)
        except OSError as exc:
            raise RpcError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _is_ipv6(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6, host)
    except OSError:
        return False
    return True


def serve(host: str, port: int, threads: int, lib_dir: Path | None = None) -> None:
    """Serve this machine's CPU to RPC clients until the process is stopped (rpc-server.cpp's main); a clear error
    when it cannot listen there."""
    check_listen(host, port)
    ggml, rpc = _libraries(lib_dir)
    cpu = ggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    if not cpu:
        raise RuntimeMissingError("the runtime has no CPU device")
    devices = (ctypes.c_void_p * 1)(cpu)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C stops the server inside the C call
    print(f"serving this machine's CPU over RPC at {host}:{port} (protocol {PROTOCOL_MAJOR}); Ctrl-C stops",
          flush=True)
    rpc.ggml_backend_rpc_start_server(f"{host}:{port}".encode(), None, threads, 1, devices)
    # it returns only when it could not create its socket (the port taken between the check and now)
    raise RpcError(f"the RPC server could not listen on {host}:{port} (see the line above)")
