"""mc-gguf serve: an OpenAI-compatible HTTP server for a GGUF on the patched runtime, with Online Dynamic Pruning."""

from __future__ import annotations

import argparse

from mc_gguf.cli.common import add_command, add_llama_flags, llama_load_kwargs, unit_float
from mc_gguf.cli.runtime import port_number
from mc_gguf.evaluate.serve import ServeSettings

DEFAULTS = ServeSettings()


def add_parser(commands) -> argparse.ArgumentParser:
    p = add_command(commands, "serve", "Serve a GGUF over HTTP with OpenAI's API (/v1/completions, "
                    "/v1/chat/completions, streaming too): llama-cpp-python's server on the patched runtime, "
                    "pruning as run and chat prune; /metrics counts the expert slots computed and skipped. Needs "
                    "the serve extra (pip install 'mc-gguf[serve]').",
                    f"example: mc-gguf serve mixtral-q4.gguf --port {DEFAULTS.port}\n"
                    f"         curl http://127.0.0.1:{DEFAULTS.port}/v1/chat/completions "
                    "-H 'Content-Type: application/json' \\\n"
                    "              -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'\n"
                    f"         curl http://127.0.0.1:{DEFAULTS.port}/metrics")
    p.add_argument("--host", default=DEFAULTS.host, help="address to listen on, without a port (default: "
                   f"{DEFAULTS.host}, this machine only; 0.0.0.0 listens on every interface)")
    p.add_argument("--port", type=port_number, default=DEFAULTS.port,
                   help=f"TCP port, 1-65535 (default: {DEFAULTS.port}, as llama-server's)")
    # the same meaning as run's and chat's --no-odp and --mu (cli/common.py add_generation_flags)
    p.add_argument("--no-odp", action="store_true", help="turn Online Dynamic Pruning off")
    p.add_argument("--mu", type=unit_float, help="one pruning threshold for every layer, in [0, 1] "
                   "(default: the file's mc.odp.mu)")
    add_llama_flags(p, ctx_help="tokens the context holds, prompt and reply together (default: the model's, at "
                    "most 4096; rounded up to a multiple of 256, as llama.cpp allocates it): a request past it is "
                    "refused with HTTP 400")
    p.add_argument("--api-key", help="require 'Authorization: Bearer API_KEY' on every request (as llama-server's "
                   "--api-key; default: none)")
    p.set_defaults(func=run_serve)
    return p


def run_serve(args: argparse.Namespace) -> None:
    from mc_gguf.evaluate.serve import serve

    load_options = llama_load_kwargs(args)
    n_ctx = load_options.pop("n_ctx")
    serve(args.model, ServeSettings(host=args.host, port=args.port, odp=not args.no_odp, mu=args.mu, n_ctx=n_ctx,
                                    api_key=args.api_key, load_options=load_options))
