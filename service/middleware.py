"""Pure ASGI middleware (no BaseHTTPMiddleware: its task groups wrap errors raised while the body streams)."""

from __future__ import annotations

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response


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
