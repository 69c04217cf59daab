"""Pure ASGI middleware: request metrics, the API key, and the body's size limit and idle timeout.

The body guards sit below the app, on `receive`, because uvicorn has neither: a declared Content-Length over
the limit is refused before one byte of the body is read, and a streamed (chunked) body is cut off the
moment it passes the limit (413); a client that sends nothing for --read-timeout-s mid-body gets 408. Either
way the server never holds more than the limit, and the handler's admission slot is freed as the error
unwinds it. Both answers close the connection: the rest of that body will never be read.

In the app these run inside CORS (app.py), so a browser can read their refusals (401, 413, 408).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time

from starlette.exceptions import HTTPException

from .metrics import Metrics

PUBLIC_PREFIXES = ("/health/", "/static/")  # no data there; the page asks for the key itself
PUBLIC_PATHS = ("/", "/favicon.ico")
CLOSE = {"Connection": "close"}  # after a refused body: that connection cannot carry another request


async def send_json(send, status: int, detail: str, headers: dict | None = None):
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"connection", b"close")]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class MetricsMiddleware:
    """Counts every HTTP response by route and status, and its latency (including the ones refused by the
    middleware below it)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            self.metrics.observe_request(scope["path"], scope["method"], status[0], time.perf_counter() - start)


class ApiKeyMiddleware:
    """With a key set, every path but /health/*, the page and its assets needs `X-API-Key: KEY` or
    `Authorization: Bearer KEY` (compared in constant time)."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, (key or "").encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.key or self._public(scope["path"]):
            return await self.app(scope, receive, send)
        given = header(scope, b"x-api-key")
        if given is None and (auth := header(scope, b"authorization") or "").lower().startswith("bearer "):
            given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given.encode(), self.key):
            return await send_json(send, 401, "missing or wrong API key: send it as X-API-Key or "
                                              "Authorization: Bearer", {"WWW-Authenticate": "Bearer"})
        return await self.app(scope, receive, send)

    @staticmethod
    def _public(path: str) -> bool:
        return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class BodyLimitMiddleware:
    """The body's size limit (413) and its idle timeout between chunks (408)."""

    def __init__(self, app, max_bytes: int, read_timeout_s: float = 30.0):
        self.app, self.max_bytes, self.read_timeout_s = app, max_bytes, read_timeout_s

    def _too_large(self) -> str:
        return f"request body larger than the {self.max_bytes / 1024 / 1024:g} MB limit (--max-upload-mb)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = header(scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                return await send_json(send, 400, "invalid Content-Length header")
            if int(declared) > self.max_bytes:
                return await send_json(send, 413, self._too_large())
        received, body_done = 0, False

        async def guarded_receive():
            nonlocal received, body_done
            if body_done:  # after the body only http.disconnect can come: waiting for it is no stall
                return await receive()
            message = await self._next_chunk(receive)
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._too_large(), headers=CLOSE)
            return message

        await self.app(scope, guarded_receive, send)

    async def _next_chunk(self, receive):
        try:
            return await asyncio.wait_for(receive(), self.read_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(408, f"no request body data for {self.read_timeout_s:g} s (--read-timeout-s)",
                                headers=CLOSE) from None
