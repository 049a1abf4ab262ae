"""An OpenAI-compatible HTTP server for a GGUF on the patched runtime, with the expert slots it pruned.

The server is llama-cpp-python's own (``llama_cpp.server``: /v1/completions, /v1/chat/completions with
streaming, /v1/models, /v1/embeddings, /extras/tokenize), serving the very library ``run.load`` loads: the
file is checked before llama.cpp reads it, Online Dynamic Pruning follows its ``mc.odp.*`` thresholds (or
``mu``, or is off), per-expert files run, and the model's slot counters feed ``/metrics`` (Prometheus' text
format). llama.cpp's own llama-server would be a second C++ build (and a web UI) of the same patched tree,
for the same endpoints.

llama_cpp.server makes its model in ``LlamaProxy.load_llama_from_model_settings`` (llama_cpp/server/model.py),
a stock ``llama_cpp.Llama`` built from ``ModelSettings``. ``create_app`` hands it a model loaded here instead:
while llama_cpp.server's ``create_app`` runs, its module's ``LlamaProxy`` is a subclass whose loader returns
that model; its routes, middleware, error handling and settings are llama_cpp.server's own.

Nothing here imports fastapi, uvicorn or llama_cpp at import time: the ``serve`` extra
(``pip install mc-gguf[serve]``) is needed only when a server is made.
"""

from __future__ import annotations

import functools
import math
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mc_gguf.errors import ChatTemplateError, McGgufError

if TYPE_CHECKING:
    from mc_gguf.prune.rule import SlotCounts

# what llama_cpp.server imports (llama-cpp-python's `server` extra): module -> its package on PyPI
SERVER_PACKAGES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "pydantic_settings": "pydantic-settings",
                   "sse_starlette": "sse-starlette", "starlette_context": "starlette-context", "yaml": "PyYAML"}
# llama.cpp rounds the context up to a multiple of this (llama-context.cpp: GGML_PAD(cparams.n_ctx, 256))
CONTEXT_PAD = 256
# how long a stopping server waits for requests in flight before cancelling them (uvicorn's graceful shutdown)
SHUTDOWN_GRACE_S = 5
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text exposition format


class ServeError(McGgufError):
    """The server cannot start: packages missing, or an address it cannot listen on."""


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


def require_server_packages() -> None:
    """A clear error naming what to install when llama_cpp.server's packages are missing."""
    from importlib.util import find_spec

    missing = [package for module, package in SERVER_PACKAGES.items() if find_spec(module) is None]
    if missing:
        raise ServeError(f"serving needs {', '.join(missing)}: pip install 'mc-gguf[serve]' (or those packages "
                         "by name; not llama-cpp-python[server], which would replace the patched runtime)")


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


def create_app(llm, *, alias: str | None = None, api_key: str | None = None):
    """llama_cpp.server's FastAPI app serving ``llm`` (a model ``run.load`` made), with ``/metrics``.

    ``alias`` is the model's id in /v1/models (default: the file's name); requests may name any model, they
    get this one. Chat uses the file's own chat template, as ``mc-gguf chat`` does (``run.chat_formatter``); a
    template jinja cannot compile leaves completions served and chat requests refused (HTTP 400) with jinja's
    reason. Requests are served one at a time, in the order they came (llama_cpp.server's lock; a new request
    does not interrupt a stream in flight).
    """
    require_server_packages()
    import llama_cpp.server.app as server_app
    from fastapi import Depends
    from fastapi.responses import PlainTextResponse
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    _use_file_chat_template(llm)
    alias = alias or Path(llm.model_path).name
    # every field given: ServerSettings would otherwise read HOST, API_KEY, ... from the environment
    server_settings = ServerSettings(host="127.0.0.1", port=8080, api_key=api_key, interrupt_requests=False,
                                     disable_ping_events=False, root_path="", ssl_keyfile=None, ssl_certfile=None)
    with _serving(llm):
        app = server_app.create_app(server_settings=server_settings,
                                    model_settings=[ModelSettings(model=str(llm.model_path), model_alias=alias)])
    app.add_middleware(_StatusAfterFirstEvent, routes=server_app.router.routes)
    slots = _SlotReader(llm, server_app.llama_inner_lock)

    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(metrics_text(await slots.read()), media_type=METRICS_CONTENT_TYPE)

    app.add_api_route("/metrics", metrics, methods=["GET"], summary="Expert slots computed and skipped",
                      dependencies=[Depends(server_app.authenticate)], tags=["Extras"],
                      response_class=PlainTextResponse)
    return app


@contextmanager
def _serving(llm):
    """llama_cpp.server's ``LlamaProxy`` (as its app module names it) handing out ``llm``, for the block."""
    import llama_cpp.server.app as server_app

    class LoadedLlamaProxy(server_app.LlamaProxy):
        """LlamaProxy whose loader (a stock ``llama_cpp.Llama`` from ModelSettings upstream) returns ``llm``."""

        def load_llama_from_model_settings(self, settings):
            return llm

    stock = server_app.LlamaProxy
    server_app.LlamaProxy = LoadedLlamaProxy
    try:
        yield
    finally:
        server_app.LlamaProxy = stock


class _StatusAfterFirstEvent:
    """ASGI middleware: a streamed request that fails before its first event gets the error response a request that
    is not streamed gets (llama_cpp.server's RouteErrorHandler: HTTP 400 "context_length_exceeded" for a prompt
    past the context), not a 200 whose stream breaks off.

    llama_cpp.server answers a streamed request at once with 200 and an event stream (sse_starlette), and only
    then calls the model, which checks the prompt (llama.py _create_completion: "Requested tokens (N) exceed
    context window of M"). Here the response's start is held back until its first bytes; an exception before
    them is answered by the route's own error formatter.
    """

    def __init__(self, app, routes):
        self.app = app
        self.routes = {route.path: route for route in routes if hasattr(route, "error_message_wrapper")}

    async def __call__(self, scope, receive, send):
        route = self.routes.get(scope.get("path")) if scope["type"] == "http" else None
        if route is None:
            return await self.app(scope, receive, send)
        body = bytearray()
        held = []  # the response's messages, until one carries bytes
        committed = False

        async def receive_keeping_body():
            message = await receive()
            if message["type"] == "http.request":
                body.extend(message.get("body", b""))
            return message

        async def send_from_first_bytes(message):
            nonlocal committed
            if not committed:
                held.append(message)
                if message["type"] != "http.response.body" or not message.get("body"):
                    return  # the start, or the empty closing body a failed stream still sends (sse_starlette)
                committed = True
                while held:
                    message = held.pop(0)
                    await send(message)
                return
            await send(message)

        try:
            await self.app(scope, receive_keeping_body, send_from_first_bytes)
        except Exception as exc:
            if committed:  # the client has bytes of the response: nothing left to answer with
                raise
            from fastapi import HTTPException
            from fastapi.responses import JSONResponse

            if isinstance(exc, HTTPException):  # as FastAPI answers it
                response = JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
            else:
                status, error = route.error_message_wrapper(error=exc, body=_request_body(bytes(body)))
                response = JSONResponse({"error": error}, status_code=status)
            await response(scope, receive, send)
            return
        for message in held:  # a response without bytes
            await send(message)


def _request_body(raw: bytes):
    """The request as RouteErrorHandler's custom_route_handler reads it for its error formatters, or None."""
    import json

    from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest

    try:
        data = json.loads(raw)
        return CreateChatCompletionRequest(**data) if "messages" in data else CreateCompletionRequest(**data)
    except Exception:  # noqa: BLE001 - a body the route's own validation refused or would refuse
        return None


def _use_file_chat_template(llm) -> None:
    """Chat completions through the file's own template, as ``mc-gguf chat`` renders it."""
    from llama_cpp.llama_chat_format import chat_formatter_to_chat_completion_handler

    from mc_gguf.evaluate.run import chat_formatter

    try:
        llm.chat_handler = chat_formatter_to_chat_completion_handler(chat_formatter(llm))
    except ChatTemplateError as exc:
        reason = str(exc)
        print(f"mc-gguf serve: chat requests will be refused: {reason}", file=sys.stderr)

        def refuse(**kwargs):
            from fastapi import HTTPException

            raise HTTPException(status_code=400, detail=reason)

        llm.chat_handler = refuse


class _SlotReader:
    """The model's slot counters, read when no request is running.

    Reading them waits for the graph's last ubatch and folds its counts (llama-context.cpp mc_expert_stats), which
    must not happen while another thread decodes: they are read under llama_cpp.server's model lock, and while a
    request holds it ``/metrics`` answers the counts of the last read rather than wait for the request to end.
    """

    def __init__(self, llm, lock):
        self.llm, self.lock = llm, lock
        self.last = llm.expert_stats()

    async def read(self) -> SlotCounts:
        import anyio

        try:
            self.lock.acquire_nowait()
        except anyio.WouldBlock:
            return self.last
        try:
            self.last = self.llm.expert_stats()
        finally:
            self.lock.release()
        return self.last


def metrics_text(counts: SlotCounts) -> str:
    """``counts`` in Prometheus' text format: the slots computed and skipped since the server started and the share
    skipped. A slot is one (token, layer, routed expert) the router chose."""
    computed, skipped = sum(counts.computed), sum(counts.skipped)
    rows = [
        ("mc_gguf_expert_slots_computed_total", "counter", "Expert slots computed (token, layer, routed expert).",
         computed),
        ("mc_gguf_expert_slots_skipped_total", "counter", "Expert slots Online Dynamic Pruning skipped.", skipped),
        ("mc_gguf_expert_slots_skipped_ratio", "gauge", "Share of the expert slots skipped: skipped / (computed + "
         "skipped), 0 before any slot.", counts.skipped_share),
    ]
    lines = []
    for name, kind, help_text, value in rows:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n"


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
