"""An OpenAI-compatible HTTP server for a GGUF on the patched runtime, with the expert slots it pruned.

The server is llama-cpp-python's own (``llama_cpp.server``: /v1/completions, /v1/chat/completions with
streaming, /v1/models, /v1/embeddings, /extras/tokenize), serving the very library ``run.load`` loads: the
file is checked before llama.cpp reads it, Online Dynamic Pruning follows its ``mc.odp.*`` thresholds (or
``mu``, or is off), per-expert files run, and the model's slot counters feed ``/metrics`` (Prometheus' text
format). llama.cpp's own llama-server would be a second C++ build (and a web UI) of the same patched tree,
for the same endpoints.

``serve`` takes the address first, loads the model with its context padded as llama.cpp pads it, and runs
llama_cpp.server's app with that model in it (serve_app.py) under uvicorn, ending the replies in flight at
their next token when it stops.

Nothing here imports fastapi, uvicorn or llama_cpp at import time: the ``serve`` extra
(``pip install mc-gguf[serve]``) is needed only when a server is made.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

from mc_gguf.evaluate.serve_app import ServeError, create_app, require_server_packages

# llama.cpp rounds the context up to a multiple of this (llama-context.cpp: GGML_PAD(cparams.n_ctx, 256))
CONTEXT_PAD = 256
# how long a stopping server waits for requests in flight before cancelling them (uvicorn's graceful shutdown)
SHUTDOWN_GRACE_S = 5


@dataclass(frozen=True)
class ServeSettings:
    """How ``serve`` runs a model: where it listens, pruning as ``run.load`` takes it, the context."""

    host: str = "127.0.0.1"  # this machine only, as llama-server's default
    port: int = 8080  # llama-server's default
    odp: bool = True  # Online Dynamic Pruning with the file's thresholds (a stock GGUF runs unpruned)
    mu: float | None = None  # one threshold for every layer instead of the file's
    n_ctx: int | None = None  # tokens the context holds (rounded up to CONTEXT_PAD); None: the model's, at most 4096
    api_key: str | None = None  # when set, every request needs "Authorization: Bearer API_KEY" (llama-server's)
    # where the model runs, run.load's keywords (llama.cpp's -t, -ngl, --cpu-moe, -ot, --rpc, --no-repack)
    load_options: dict = field(default_factory=dict)


def load_for_serving(path: str | Path, settings: ServeSettings = ServeSettings()):
    """``run.load`` of ``path`` with ``settings``, its context a multiple of CONTEXT_PAD tokens.

    llama.cpp pads the context it allocates (CONTEXT_PAD); llama-cpp-python checks prompts against that padded
    size but keeps only the tokens it asked for (llama.py: ``_n_ctx`` and ``input_ids``), so a prompt between
    the two would fail inside it instead of being refused. Asking for the padded size makes both agree.
    """
    from mc_gguf.evaluate.run import context_size
    from mc_gguf.loader.model import load

    n_ctx = _padded(settings.n_ctx) if settings.n_ctx else None
    options = dict(odp=settings.odp, mu=settings.mu, **settings.load_options)
    llm = load(path, n_ctx=n_ctx, **options)
    if context_size(llm) != llm.n_ctx():  # the model's own context length, not a multiple of CONTEXT_PAD
        n_ctx = llm.n_ctx()
        llm.close()
        llm = load(path, n_ctx=n_ctx, **options)
    return llm


def _pruning(path: str | Path, settings: ServeSettings) -> str:
    """How the server prunes, in words."""
    from mc_gguf.loader.model import read_odp_metadata

    if not settings.odp:
        return "off"
    if settings.mu is not None:
        return f"mu = {settings.mu:g} in every layer"
    return "the file's thresholds" if read_odp_metadata(path) is not None else "none (the file has no thresholds)"


def _padded(n_ctx: int) -> int:
    return math.ceil(n_ctx / CONTEXT_PAD) * CONTEXT_PAD


def _stoppable(llm, stop: threading.Event) -> None:
    """Every completion of ``llm`` ends at its next token once ``stop`` is set (a stopping criterion, as llama.py's
    create_completion takes them; chat completions go through create_completion too, llama_chat_format's
    handlers). A generation runs in a worker thread that nothing else can interrupt: without this, a stopping
    server would wait for every reply in flight to reach its max_tokens, or cancel its request half-way."""
    from llama_cpp import StoppingCriteriaList

    create = llm.create_completion

    def stopping(input_ids, logits) -> bool:
        return stop.is_set()

    @functools.wraps(create)
    def create_completion(*args, stopping_criteria=None, **kwargs):
        criteria = StoppingCriteriaList([*(stopping_criteria or []), stopping])
        return create(*args, stopping_criteria=criteria, **kwargs)

    llm.create_completion = create_completion


def listening_socket(host: str, port: int):
    """A socket bound to ``host``:``port``, not yet listening (connections are refused until ``serve`` listens), or
    a clear error: a port in use or not allowed, an unknown host, a host with a port in it."""
    import socket

    from mc_gguf.runtime.rpc import check_listen

    check_listen(host, port)  # the same checks and messages as `mc-gguf runtime rpc-server`
    family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's own (config.bind_socket)
    try:
        sock.bind(address)
    except OSError as exc:  # taken since check_listen looked
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve(path: str | Path, settings: ServeSettings = ServeSettings()) -> None:
    """Serve ``path`` at http://HOST:PORT/v1 until the process is interrupted (Ctrl-C, SIGTERM).

    The address is taken before the model loads, so a port in use is refused at once. When the server stops, the
    replies being generated end at their next token: one not streamed is sent as it stands (finish_reason "stop"),
    a stream ends without its "[DONE]" (sse_starlette closes streams at shutdown); a request still busy after
    SHUTDOWN_GRACE_S seconds (a long prompt's evaluation) is cancelled. uvicorn raises the signal it stopped on
    again once it is done: SIGINT (and SIGTERM where the caller turns it into KeyboardInterrupt, as the CLI does)
    ends in KeyboardInterrupt.
    """
    require_server_packages()
    sock = listening_socket(settings.host, settings.port)
    try:
        llm = load_for_serving(path, settings)
        app = create_app(llm, api_key=settings.api_key)
        import uvicorn

        sock.listen(2048)  # uvicorn's default backlog
        host = settings.host.strip("[]")
        host = f"[{host}]" if ":" in host else host  # an IPv6 address, bracketed as in a URL
        print(f"mc-gguf serve: {Path(path).name} at http://{host}:{settings.port}/v1 (context {llm.n_ctx()} tokens, "
              f"pruning: {_pruning(path, settings)}); expert slots at /metrics; Ctrl-C stops", flush=True)
        stop = threading.Event()
        _stoppable(llm, stop)

        class Server(uvicorn.Server):
            """uvicorn's server, which on Ctrl-C or SIGTERM also ends the replies in flight (at their next token)."""

            def handle_exit(self, sig, frame) -> None:
                stop.set()
                super().handle_exit(sig, frame)

        config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
        Server(config).run(sockets=[sock])
    finally:
        sock.close()
