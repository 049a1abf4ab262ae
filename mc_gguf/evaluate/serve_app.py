"""llama_cpp.server's FastAPI app serving a model loaded here (``loader.model.load``), with the expert slots at
``/metrics`` (slot_metrics.py).

llama_cpp.server makes its model in ``LlamaProxy.load_llama_from_model_settings`` (llama_cpp/server/model.py),
a stock ``llama_cpp.Llama`` built from ``ModelSettings``. ``create_app`` hands it a model loaded here instead:
while llama_cpp.server's ``create_app`` runs, its module's ``LlamaProxy`` is a subclass whose loader returns
that model; its routes, middleware, error handling and settings are llama_cpp.server's own, and one middleware
more gives a streamed request that fails before its first event the error response (RouteErrorHandler's) a
request that is not streamed gets.

Nothing here imports fastapi or llama_cpp at import time: ``require_server_packages`` names the ``serve`` extra
when its packages are missing.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

from mc_gguf.errors import ChatTemplateError, McGgufError
from mc_gguf.evaluate.slot_metrics import METRICS_CONTENT_TYPE, SlotReader, metrics_text

# what llama_cpp.server imports (llama-cpp-python's `server` extra): module -> its package on PyPI
SERVER_PACKAGES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "pydantic_settings": "pydantic-settings",
                   "sse_starlette": "sse-starlette", "starlette_context": "starlette-context", "yaml": "PyYAML"}


class ServeError(McGgufError):
    """The server cannot start: packages missing, or an address it cannot listen on."""


def require_server_packages() -> None:
    """A clear error naming what to install when llama_cpp.server's packages are missing."""
    from importlib.util import find_spec

    missing = [package for module, package in SERVER_PACKAGES.items() if find_spec(module) is None]
    if missing:
        raise ServeError(f"serving needs {', '.join(missing)}: pip install 'mc-gguf[serve]' (or those packages "
                         "by name; not llama-cpp-python[server], which would replace the patched runtime)")


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
    slots = SlotReader(llm, server_app.llama_inner_lock)

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
