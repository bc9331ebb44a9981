"""The admin API key: `Authorization: Bearer <key>` or `X-API-Key: <key>`, compared in constant time against
every configured key (XMODAL_ADMIN_KEYS). Keys are never logged nor echoed in errors."""

from __future__ import annotations

import hmac

from fastapi import Depends, Request

from service.errors import AdminDisabled, Unauthorized
from service.state import ServiceState, get_state


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
