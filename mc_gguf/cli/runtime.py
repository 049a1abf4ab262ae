"""mc-gguf runtime build | status: the patched llama.cpp."""

from __future__ import annotations

import argparse
import sys
import time

from mc_gguf.cli.common import add_command, positive_int


def add_parser(commands) -> None:
    runtime = commands.add_parser("runtime", help="Build, install and check the patched llama.cpp runtime.",
                                  description="Build, install and check the patched llama.cpp runtime.")
    runtime_commands = runtime.add_subparsers(dest="runtime_command", required=True, metavar="COMMAND")
    p = add_command(runtime_commands, "build", "Build llama-cpp-python with the mc-gguf patches and install it "
                    "(cached: a second run installs the cached wheel in seconds).",
                    "example: mc-gguf runtime build            (CPU)\n"
                    "         mc-gguf runtime build --cuda --cuda-architectures 86\n"
                    "         mc-gguf runtime build --vulkan")
    p.add_argument("--cuda", action="store_true", help="also build the CUDA backend")
    p.add_argument("--metal", action="store_true", help="also build the Metal backend (macOS)")
    p.add_argument("--vulkan", action="store_true", help="also build the Vulkan backend (needs glslc and the Vulkan "
                   "headers; scripts/vulkan_sdk.sh installs them on Debian and Ubuntu). Vulkan runs every layer "
                   "but the experts whose pruned slots it cannot skip, which stay on the CPU")
    p.add_argument("--cuda-architectures", help="CMAKE_CUDA_ARCHITECTURES, e.g. 86 or '80;89' (default: CMake's)")
    p.add_argument("--force", action="store_true", help="rebuild even when a cached wheel exists")
    p.set_defaults(func=run_build)
    p = add_command(runtime_commands, "status", "Say whether the installed llama_cpp is the patched runtime "
                    "(exit 1 when it is not).", "example: mc-gguf runtime status")
    p.set_defaults(func=run_status)
    p = add_command(runtime_commands, "rpc-server", "Lend this machine's CPU to llama.cpp clients over ggml's RPC "
                    "(llama.cpp's rpc-server, patched: it speaks protocol 107 and skips pruned expert slots); "
                    "`mc-gguf run|chat|eval --rpc HOST:PORT` use it. No authentication: keep it on a trusted "
                    "network.",
                    "example: mc-gguf runtime rpc-server --port 50052\n"
                    "         mc-gguf run model.gguf -p 'Hello' --rpc 127.0.0.1:50052")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on, without a port (default: 127.0.0.1, "
                   "this machine only)")
    p.add_argument("--port", type=port_number, default=50052, help="TCP port, 1-65535 (default: 50052, as rpc-server's)")
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: the cores)")
    p.set_defaults(func=run_rpc_server)


def port_number(text: str) -> int:
    port = positive_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1-65535)")
    return port


def run_build(args: argparse.Namespace) -> None:
    from mc_gguf.runtime.build import BuildFlags, ensure_runtime

    flags = BuildFlags(cuda=args.cuda, metal=args.metal, vulkan=args.vulkan, cuda_architectures=args.cuda_architectures)
    started = time.perf_counter()
    wheel = ensure_runtime(flags, force=args.force)
    print(f"patched runtime ready: {wheel.name} ({time.perf_counter() - started:.0f} s)")


def run_status(args: argparse.Namespace) -> None:
    from mc_gguf.runtime.status import REQUIRED_PATCH_LEVEL, runtime_status

    status = runtime_status()
    print(status.describe())
    if not status.patched or status.patch_level < REQUIRED_PATCH_LEVEL:
        sys.exit(1)


def run_rpc_server(args: argparse.Namespace) -> None:
    import os

    from mc_gguf.runtime.rpc import serve
    from mc_gguf.runtime.status import require_patched_runtime

    require_patched_runtime()
    serve(args.host, args.port, args.threads or os.cpu_count() or 1)
