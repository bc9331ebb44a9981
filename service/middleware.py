"""Pure ASGI middleware (no BaseHTTPMiddleware: its task groups wrap errors raised while the body streams)."""

from __future__ import annotations

import logging
import re
import time
import uuid

from fastapi import HTTPException
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.budget import MB, MemoryBudget
from service.errors import InputTooLarge, Overloaded, error_response, xmodal_response
from service.logs import request_id


class BodyLimit:
    """413 for bodies over ``limit`` bytes: at once from Content-Length, or as soon as a chunked body
    streams past it (FastAPI re-raises an HTTPException from body parsing; other errors become 400)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            message = f"request body is {int(declared)} bytes; the limit is {self.limit}"
            return await error_response(413, "payload_too_large", message)(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"request body is over the limit of {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


class BodyBudget:
    """A request whose body is over ``SMALL_BODY`` bytes (from Content-Length; a chunked one counts as the largest
    body allowed) reserves ``COPIES`` x its length of the body budget (XMODAL_BODY_MEMORY_MB) before its body is
    read, and holds it until its answer is sent: so many large uploads at once wait their turn, or get 429 (413 for
    one larger than the whole budget), rather than the process growing by their copies. A search's JSON of a few
    KB passes at once."""

    SMALL_BODY = 1 << 16
    COPIES = 3  # the body's bytes, its JSON text, the base64-decoded file(s)

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        budget: MemoryBudget | None = getattr(scope["app"].state, "body_budget", None) if "app" in scope else None
        if scope["type"] != "http" or budget is None:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit():
            length = int(declared)
        elif b"transfer-encoding" in headers:
            length = self.limit
        else:
            length = 0
        if length <= self.SMALL_BODY:
            return await self.app(scope, receive, send)
        holding = budget.reserve(min(length, self.limit) * self.COPIES, f"a body of {length / MB:,.1f} MB")
        try:
            await holding.__aenter__()
        except (InputTooLarge, Overloaded) as exc:  # before a byte of the body is read
            return await xmodal_response(exc)(scope, receive, send)
        try:
            await self.app(scope, receive, send)
        finally:
            await holding.__aexit__(None, None, None)


class CountRequests:
    """Counts requests by route template and status for /metrics."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            state = getattr(scope["app"].state, "xmodal", None) if "app" in scope else None
            if state is not None:
                path = getattr(scope.get("route"), "path", "unmatched")
                state.metrics.requests.labels(path, str(status)).inc()


SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
access_log = logging.getLogger("service.access")
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes: at DEBUG, not to drown the log


class RequestId:
    """Each request's id: the client's ``X-Request-ID`` when it is sane (1-128 of ``A-Za-z0-9._:-``), else a new
    one. Sent back in the response's ``X-Request-ID``, carried by every log line of the request (service.logs), and
    ending with one access line (method, path, status, duration; never headers or the query string; at DEBUG for
    probes and scrapes; requests refused on arrival by admission never reach it: service.admission.FrontDoor)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if SANE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        # Not reset afterwards: each request runs in a task of its own, in a copy of the context, and the 500 handler
        # (outside this middleware, in Starlette's ServerErrorMiddleware) still logs under the request's id.
        request_id.set(rid)
        scope.setdefault("state", {})["arrived"] = time.monotonic()  # deadlines count from here (state.deadline_of)
        t0, status = time.perf_counter(), 500

        async def tagged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("x-request-id", rid)
            await send(message)

        try:
            await self.app(scope, receive, tagged)
        finally:
            ms = round((time.perf_counter() - t0) * 1000, 2)
            method, path = scope["method"], scope["path"]
            fields = {"method": method, "path": path, "status": status, "duration_ms": ms}
            level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
            access_log.log(level, "%s %s %d %.1f ms", method, path, status, ms, extra=fields)
