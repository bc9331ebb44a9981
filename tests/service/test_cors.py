"""CORS (XMODAL_CORS_ORIGINS) through the real app: off by default; when set, a preflight from an allowed origin
is answered with its headers (before any API key check), one from another origin is refused, and answers carry
the allow-origin header only for an allowed origin."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

ALLOWED = "https://search.example.org"
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
TEXT = {"index": "demo", "query": {"text": "a comet"}, "k": 1}


@pytest.fixture(scope="module")
def client(served_data: Path):
    settings = Settings(
        data_dir=served_data, reload_interval_s=0, cors_origins=f"{ALLOWED}, http://localhost:3000", api_keys="k1"
    )
    with TestClient(create_app(settings)) as c:
        yield c


def test_preflight_from_an_allowed_origin(client: TestClient) -> None:
    r = client.options("/v1/search", headers={"Origin": ALLOWED, **PREFLIGHT})
    assert r.status_code == 200, r.text  # no key: a browser never sends one on a preflight
    assert r.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in r.headers["access-control-allow-methods"]
    assert {"authorization", "content-type"} <= set(r.headers["access-control-allow-headers"].lower().split(", "))
    answer = client.post("/v1/search", json=TEXT, headers={"Origin": ALLOWED, "Authorization": "Bearer k1"})
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ALLOWED
    assert "x-request-id" in answer.headers["access-control-expose-headers"].lower()


def test_preflight_from_a_refused_origin(client: TestClient) -> None:
    r = client.options("/v1/search", headers={"Origin": "https://evil.example.com", **PREFLIGHT})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    headers = {"Origin": "https://evil.example.com", "Authorization": "Bearer k1"}
    answer = client.post("/v1/search", json=TEXT, headers=headers)
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers


def test_cors_is_off_by_default(served_data: Path) -> None:
    with TestClient(create_app(Settings(data_dir=served_data, reload_interval_s=0))) as c:
        r = c.options("/v1/search", headers={"Origin": ALLOWED, **PREFLIGHT})
        assert "access-control-allow-origin" not in r.headers and r.status_code == 405
        assert "access-control-allow-origin" not in c.post("/v1/search", json=TEXT, headers={"Origin": ALLOWED}).headers
