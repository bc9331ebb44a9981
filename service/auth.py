"""API keys: `Authorization: Bearer <key>` (what OpenAI's client sends) or `X-API-Key: <key>`, compared in constant
time against every configured key. Admin routes need an admin key (XMODAL_ADMIN_KEYS); search-side routes need an
API key or an admin key once XMODAL_API_KEYS is set. Keys are never logged nor echoed in errors."""

from __future__ import annotations

import hmac

from fastapi import Depends, Request

from service.errors import AdminDisabled, Forbidden, Unauthorized
from service.state import ServiceState, get_state

# Open whatever keys are set: probes, Prometheus, and the search page itself (its API calls are not open).
OPEN_PATHS = frozenset({"/", "/healthz", "/readyz", "/metrics"})


def presented_key(request: Request) -> str | None:
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


def require_api_key(request: Request, state: ServiceState = Depends(get_state)) -> None:
    """Search-side routes: open while XMODAL_API_KEYS is unset; else 401 without a key, 403 for a wrong one. Given
    to whole routers (service.app), so a route added to them later is guarded unless it is listed in OPEN_PATHS."""
    keys = state.settings.api_key_list
    if not keys or getattr(request.scope.get("route"), "path", None) in OPEN_PATHS:
        return
    given = presented_key(request)
    if given is None:
        raise Unauthorized("this route needs an API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`")
    if not key_matches(given, keys + state.settings.admin_key_list):  # an admin key passes too
        raise Forbidden("the API key is not valid")
