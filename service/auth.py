"""API keys: `Authorization: Bearer <key>` (what OpenAI's client sends) or `X-API-Key: <key>`, compared in constant
time against every configured key. Admin routes need an admin key (XMODAL_ADMIN_KEYS); every other route but the
open ones needs an API key or an admin key once XMODAL_API_KEYS is set. Keys are never logged nor echoed in errors."""

from __future__ import annotations

import hmac

from fastapi import Depends, FastAPI, Request
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import AdminDisabled, Unauthorized, error_response
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


def require_admin(request: Request, state: ServiceState = Depends(get_state)) -> None:
    keys = state.settings.admin_key_list
    if not keys:
        raise AdminDisabled("admin routes are disabled: set XMODAL_ADMIN_KEYS (comma-separated keys) to enable them")
    given = presented_key(request)
    if given is None:
        raise Unauthorized("this route needs an admin key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`")
    if not key_matches(given, keys):
        raise Unauthorized("the admin key is not valid")


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
            message = "this route needs an API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`"
            refusal = error_response(401, "unauthorized", message, headers={"www-authenticate": "Bearer"})
        elif not key_matches(given, self.keys):
            refusal = error_response(403, "forbidden", "the API key is not valid")
        else:
            return await self.app(scope, receive, send)
        await refusal(scope, receive, send)


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
                    operation["responses"].setdefault("401", {**error, "description": "no API key"})
                    operation["responses"].setdefault("403", {**error, "description": "not a valid API key"})
        return app.openapi_schema

    app.openapi = openapi
