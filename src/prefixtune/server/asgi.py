"""ASGI plumbing for the server: a request-body limit, a response counter, uvicorn in a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prefixtune.server.schemas import error_body


class BodyLimit:
    """ASGI middleware: read at most ``limit`` bytes of a request body, else answer 413.

    The body is read before the app runs and replayed to it; later ``receive`` calls go to the
    server, so the app still sees the client disconnect."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        chunks, size, more = [], 0, True
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            more = False
            size = int(declared)
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False) and size <= self.limit
        if size > self.limit:
            response = JSONResponse(error_body(f"request body over {self.limit} bytes", "invalid_request_error",
                                               code="payload_too_large"), 413)
            return await response(scope, receive, send)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class HttpCounter:
    """ASGI middleware counting responses by path (known paths only) and status."""

    def __init__(self, app: ASGIApp, counts: Counter[tuple[str, int]], paths: tuple[str, ...]) -> None:
        self.app, self.counts, self.paths = app, counts, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = next((p for p in self.paths if scope["path"].startswith(p)), "other")

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.counts[(path, message["status"])] += 1
            await send(message)

        return await self.app(scope, receive, counting_send)


class ServerThread:
    """Run an app with uvicorn in a background thread on ``host`` and a free port (tests, benchmarks).

    ``with ServerThread(app) as server: server.url`` — started when entered (waits until uvicorn
    listens), stopped when left."""

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 60.0) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.start_timeout_s = start_timeout_s

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server on {self.url} did not start within {self.start_timeout_s} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout_s)
        self.sock.close()

    def __exit__(self, *exc: object) -> None:
        self.stop()
