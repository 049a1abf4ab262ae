"""ggml's RPC backend: lend this machine's CPU to llama.cpp clients, and run models on such servers.

The runtime is built with ``GGML_RPC`` on (source.BASE_CMAKE_ARGS), so its
``libggml-rpc`` holds both sides. ``serve`` does what llama.cpp's
``tools/rpc/rpc-server.cpp`` does: ``ggml_backend_rpc_start_server`` with the
CPU device. ``add_servers`` does what llama.cpp's ``--rpc`` does
(common/arg.cpp): ``ggml_backend_rpc_add_server`` per endpoint and every
device of it registered, so that llama.cpp offloads layers to them.

Patch 0012 makes the series speak RPC protocol major 107, so a patched
client and a stock ``rpc-server`` (which would read -1 expert ids as
indices and does not know MUL_MAT_ID_GROUPS) refuse each other. ggml-rpc's
own client aborts the process on that refusal (negotiate_hello,
GGML_ABORT), so ``add_servers`` first asks each server its version itself,
with the same HELLO message, and refuses a stranger with a clear error.
"""

from __future__ import annotations

import ctypes
import signal
import socket
import struct
from pathlib import Path

from mc_gguf.errors import McGgufError, RuntimeMissingError
from mc_gguf.runtime.build import installed_library_dir, loaded_library

# ggml-rpc.h of the patched tree (patch 0012); a test reads it from there.
PROTOCOL_MAJOR = 107
RPC_CMD_HELLO = 14       # ggml-rpc.cpp: enum rpc_cmd, "must be always 14"
RPC_CONN_CAPS_SIZE = 24  # ggml-rpc/transport.h
GGML_BACKEND_DEVICE_TYPE_CPU = 0  # ggml-backend.h: enum ggml_backend_dev_type

_registered: set[str] = set()


class RpcError(McGgufError):
    """An RPC server cannot be reached, or is not one the patched runtime may use."""


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), or a clear error."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RpcError(f"{endpoint!r} is not HOST:PORT (e.g. 127.0.0.1:50052)")
    return host.strip("[]"), int(port)


def server_version(endpoint: str, timeout: float = 10.0) -> tuple[int, int, int]:
    """The RPC protocol version a server speaks, asked as ggml-rpc's client asks it (negotiate_hello:
    | cmd (1 byte) | size (8 bytes) | rpc_msg_hello_req |, answered | size | major minor patch pad caps |)."""
    host, port = parse_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(bytes([RPC_CMD_HELLO]) + struct.pack("<Q", RPC_CONN_CAPS_SIZE) + bytes(RPC_CONN_CAPS_SIZE))
            size = struct.unpack("<Q", _receive(sock, 8))[0]
            if size != 4 + RPC_CONN_CAPS_SIZE:
                raise RpcError(f"the RPC server at {endpoint} answered the handshake with {size} bytes: it speaks "
                               f"another protocol than this runtime (major {PROTOCOL_MAJOR})")
            major, minor, patch = _receive(sock, size)[:3]
    except OSError as exc:
        raise RpcError(f"cannot reach an RPC server at {endpoint} ({exc})") from None
    return major, minor, patch


def _receive(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise RpcError(f"the RPC server at {sock.getpeername()[0]}:{sock.getpeername()[1]} closed the connection "
                           f"during the handshake: it speaks another protocol than this runtime (major "
                           f"{PROTOCOL_MAJOR}); start `mc-gguf runtime rpc-server` there")
        data += chunk
    return data


def check_server(endpoint: str) -> None:
    """A clear error unless ``endpoint`` is a patched rpc-server of this series."""
    major, minor, patch = server_version(endpoint)
    if major != PROTOCOL_MAJOR:
        raise RpcError(f"the RPC server at {endpoint} speaks protocol {major}.{minor}.{patch}, a stock llama.cpp "
                       f"rpc-server: it would read skipped expert slots (-1) as experts. Start `mc-gguf runtime "
                       f"rpc-server` there (protocol {PROTOCOL_MAJOR})")


def _libraries(lib_dir: Path | None = None) -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """libggml and libggml-rpc of the installed runtime (or of ``lib_dir``), the very instances libllama uses:
    devices registered in another copy of libggml would be invisible to llama.cpp."""
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
    """Make the patched rpc-servers at ``endpoints`` llama.cpp devices of this process (once each)."""
    ggml, rpc = _libraries()
    for endpoint in endpoints:
        if endpoint in _registered:
            continue
        check_server(endpoint)
        reg = rpc.ggml_backend_rpc_add_server(endpoint.encode())
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
