"""The application factory. ``create_app(settings)`` builds everything in the lifespan, nothing at import."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, HTTPException
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response, install_error_handlers
from service.routes import router
from service.settings import Settings
from service.state import ServiceState

log = logging.getLogger(__name__)


class BodyLimit:
    """413 for bodies over ``limit`` bytes: at once from Content-Length, or while a chunked body streams in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                # FastAPI re-raises its own HTTPException from body parsing (any other error becomes a 400).
                raise HTTPException(413, f"request body is over the {self.limit}-byte limit")
            return message

        await self.app(scope, limited, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, "payload_too_large", f"request body is over the {self.limit}-byte limit")
        await response(scope, receive, send)


def create_app(settings: Settings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = ServiceState(settings)
        app.state.xmodal = state
        await run_in_threadpool(state.load_model)
        await run_in_threadpool(state.refresh_indexes)
        watcher = asyncio.create_task(state.watch_indexes()) if settings.reload_interval_s > 0 else None
        log.info(
            "xmodal ready: model=%s indexes=%s cache=%s", settings.model, sorted(state.indexes), state.cache.status()
        )
        try:
            yield
        finally:
            if watcher:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await state.close()

    app = FastAPI(
        title="xmodal",
        summary="Cross-modal embedding retrieval: ONNX encoders, FAISS indexes, Redis cache",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(router)

    @app.middleware("http")
    async def count_requests(request, call_next):  # noqa: ANN001, ANN202
        response = await call_next(request)
        state = getattr(request.app.state, "xmodal", None)
        route = request.scope.get("route")
        if state is not None:
            state.metrics.requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app
