"""The application factory. ``create_app(settings)`` builds everything in the lifespan, nothing at import."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection
from starlette.types import Receive, Scope, Send

from service.admin_routes import router as admin_router
from service.admission import GATED, AdmissionGate, FrontDoor
from service.auth import AdminGate, ApiKeyGate, document_api_keys, key_matches, presented_key
from service.clip_compat import router as clip_router
from service.drain import Drain, DrainGate
from service.errors import install_error_handlers
from service.events import listen
from service.job_queue import make_jobs
from service.logs import configure_logging
from service.middleware import BodyBudget, BodyLimit, CountRequests, RequestId
from service.openai_compat import router as openai_router
from service.openapi import document_service
from service.page import mount_static
from service.page import router as page_router
from service.routes import router
from service.settings import Settings
from service.state import ServiceState

log = logging.getLogger(__name__)


class XmodalApp(FastAPI):
    """FastAPI, with admission's refusals on arrival answered before FastAPI's own layers run (see FrontDoor)."""

    front_door: FrontDoor | None = None  # set once the service has started

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        door = self.front_door
        if door is not None and await door.refused(scope, send):
            return
        await super().__call__(scope, receive, send)


def front_door(settings: Settings, state: ServiceState, drain: Drain) -> FrontDoor:
    """Refusals on arrival, except for what the inner layers answer otherwise: while draining (503), without a
    valid key (401/403), and a browser's cross-origin request when CORS is on (its answer needs CORS headers)."""
    keys = settings.api_key_list + settings.admin_key_list if settings.api_key_list else []
    cors = bool(settings.cors_origin_list)

    def let_through(scope: Scope) -> bool:
        if drain.draining:
            return True
        if keys:
            given = presented_key(HTTPConnection(scope))
            if given is None or not key_matches(given, keys):
                return True
        return cors and any(name == b"origin" for name, _ in scope["headers"])

    refused = {path: state.metrics.requests.labels(path, "429") for path in GATED}  # looked up once, not per 429
    return FrontDoor(state.admission, lambda path: refused[path].inc(), let_through)


def create_app(settings: Settings) -> XmodalApp:
    drain = Drain(settings.drain_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: XmodalApp) -> AsyncIterator[None]:
        state = ServiceState(settings)
        app.state.xmodal = state
        registry = state.registry
        app.state.admission = state.admission  # for AdmissionGate
        app.state.body_budget = state.body_budget  # for BodyBudget
        app.front_door = front_door(settings, state, drain)
        app.state.jobs = make_jobs(settings, on_done=registry.refresh)
        await run_in_threadpool(registry.load_models)
        await run_in_threadpool(registry.refresh)
        tasks = []
        if settings.reload_interval_s > 0:
            tasks.append(asyncio.create_task(registry.watch()))
        if settings.redis_url:

            async def swap(_announcement: dict) -> None:
                await run_in_threadpool(registry.refresh)

            tasks.append(asyncio.create_task(listen(settings.redis_url, swap)))
        log.info(
            "xmodal ready: models=%s indexes=%s cache=%s",
            sorted(registry.model_ids().values()),
            sorted(registry.indexes),
            state.cache.status(),
        )
        restore_sigterm = drain.handle_sigterm()  # under `xmodal serve`: SIGTERM drains first
        try:
            yield
        finally:
            restore_sigterm()
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            app.front_door = None
            await app.state.jobs.close()
            await state.close()

    app = XmodalApp(
        title="xmodal",
        summary="Cross-modal embedding retrieval: ONNX encoders, FAISS indexes, Redis cache",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(openai_router)
    app.include_router(admin_router)
    app.include_router(page_router)
    app.include_router(clip_router)
    mount_static(app)

    app.state.drain = drain
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(AdmissionGate)  # inside the key check: a request without a key takes no place in flight
    app.add_middleware(BodyBudget, limit=settings.max_body_bytes)  # waiting for body memory holds no place in flight
    app.add_middleware(AdminGate, routes=admin_router.routes, keys=settings.admin_key_list)  # before any body is read
    if settings.api_key_list:  # XMODAL_API_KEYS: before any body is read
        app.add_middleware(ApiKeyGate, keys=settings.api_key_list, admin_keys=settings.admin_key_list)
        document_api_keys(app)
    app.add_middleware(DrainGate, drain=drain)
    app.add_middleware(CountRequests)
    app.add_middleware(RequestId)
    if settings.cors_origin_list:  # outermost: a preflight is answered before any key or body check
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["authorization", "content-type", "x-api-key", "x-request-id"],
            expose_headers=["retry-after", "retry-after-ms", "x-request-id"],
            max_age=600,
        )
    document_service(app, settings)  # last: what the layers above answer, on the schema as the rest leaves it
    return app


def app_from_environment() -> XmodalApp:
    """The app with settings from the environment: the factory each `xmodal serve --workers N` process calls."""
    settings = Settings()
    configure_logging(settings.log_format)  # a fresh process: nothing configured its logging yet
    return create_app(settings)
