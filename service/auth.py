"""API keys: `Authorization: Bearer <key>` (what OpenAI's client sends) or `X-API-Key: <key>`, compared in constant
time against every configured key. Admin routes need an admin key (XMODAL_ADMIN_KEYS); every other route but the
open ones needs an API key or an admin key once XMODAL_API_KEYS is set. Keys are never logged nor echoed in errors.

Both checks are pure ASGI gates in front of the app, so a request refused costs no body parsing (JSON, multipart).
One rule for the answers, on every route: 401 `unauthorized` when no key is sent (with `WWW-Authenticate: Bearer`),
403 `forbidden` when the key sent is not accepted there (not a configured key, or a search key on an admin route),
403 `admin_disabled` on admin routes while no admin key is configured."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from fastapi import Depends, FastAPI, Request
from starlette.requests import HTTPConnection
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from models.errors import XmodalError
from service.errors import AdminDisabled, Forbidden, Unauthorized, xmodal_response
from service.state import ServiceState, get_state

# Open whatever keys are set: probes, Prometheus, the API's own docs, and the search page with its static files
# (the page's API calls are not open).
OPEN_PATHS = frozenset(
    {"/", "/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)
OPEN_PREFIXES = ("/static/",)


def presented_key(request: HTTPConnection) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key") or None


def key_matches(given: str, keys: list[str]) -> bool:
    # Every key is compared (no early exit), each in constant time: timing says nothing about which one is close.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given.encode(), key.encode())
    return matched


ADMIN_CHECKED = "admin_key_checked"  # set in the request's scope state by AdminGate once the key is good


def admin_refusal(given: str | None, keys: list[str]) -> XmodalError | None:
    """Why a request with key ``given`` may not use an admin route (None: it may)."""
    if not keys:
        return AdminDisabled("admin routes are disabled: set XMODAL_ADMIN_KEYS (comma-separated keys) to enable them")
    if given is None:
        return Unauthorized("this route needs an admin key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`")
    if not key_matches(given, keys):
        return Forbidden("the key is not an admin key")
    return None


class AdminGate:
    """The admin routes (``routes``: a request that matches one by path and method) need an admin key, checked
    before anything reads the body, whether or not XMODAL_API_KEYS is set: a client without one costs no parsing of
    a 10 MB JSON body."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute], keys: list[str]) -> None:
        self.app, self.routes, self.keys = app, list(routes), keys
        # the routes' paths up to their first parameter: a request on no such path (a search) is not matched against
        # each route's pattern
        self.prefixes = tuple({route.path.split("{", 1)[0] for route in self.routes})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not scope["path"].startswith(self.prefixes)
            or not any(route.matches(scope)[0] == Match.FULL for route in self.routes)
        ):
            return await self.app(scope, receive, send)
        refusal = admin_refusal(presented_key(HTTPConnection(scope)), self.keys)
        if refusal is not None:
            return await xmodal_response(refusal)(scope, receive, send)
        scope.setdefault("state", {})[ADMIN_CHECKED] = True
        await self.app(scope, receive, send)


def require_admin(request: Request, state: ServiceState = Depends(get_state)) -> None:
    """The admin router's guard: passed by AdminGate, which checked the key before the body; checked here (after it)
    only where the app was built without the gate, so that an admin route is never open."""
    if request.scope.get("state", {}).get(ADMIN_CHECKED):
        return
    refusal = admin_refusal(presented_key(request), state.settings.admin_key_list)
    if refusal is not None:
        raise refusal


class ApiKeyGate:
    """XMODAL_API_KEYS: 401 without a key, 403 with a wrong one (an admin key passes too; admin routes then check
    theirs), before anything reads the body, so that a client without a key costs no parsing. Every path but the
    open ones is guarded, routes added later included."""

    def __init__(self, app: ASGIApp, keys: list[str], admin_keys: list[str]) -> None:
        self.app, self.keys = app, keys + admin_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return await self.app(scope, receive, send)
        given = presented_key(HTTPConnection(scope))
        if given is None:
            refusal: XmodalError = Unauthorized(
                "this route needs an API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`"
            )
        elif not key_matches(given, self.keys):
            refusal = Forbidden("the API key is not valid")
        else:
            return await self.app(scope, receive, send)
        await xmodal_response(refusal)(scope, receive, send)


def document_api_keys(app: FastAPI) -> None:
    """With XMODAL_API_KEYS set, the OpenAPI schema says so: a bearer scheme (the docs page's Authorize button) on
    every guarded operation, and their 401 and 403 answers."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["apiKey"] = {
                "type": "http",
                "scheme": "bearer",
                "description": "a key from XMODAL_API_KEYS (or XMODAL_ADMIN_KEYS); X-API-Key: <key> works too",
            }
            error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            for path, operations in schema.get("paths", {}).items():
                if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
                    continue
                for operation in operations.values():
                    operation["security"] = [{"apiKey": []}]
                    operation["responses"].setdefault("401", {**error, "description": "no key sent"})
                    operation["responses"].setdefault("403", {**error, "description": "the key sent is not valid"})
        return app.openapi_schema

    app.openapi = openapi
