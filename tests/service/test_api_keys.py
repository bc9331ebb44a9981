"""API keys through the real app. Search keys (XMODAL_API_KEYS): every search-side route needs a key once keys are
set (401 without, 403 for a wrong one, an admin key passes too); probes, metrics and the page stay open; and the real
`openai` client, given `api_key`, is let in while a wrong key raises its PermissionDeniedError. Admin keys
(XMODAL_ADMIN_KEYS): checked before the body is read, whether or not search keys are set, with the same statuses
(401 without a key, 403 with one that is not an admin key)."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from models.bundle import DEFAULT_MODEL
from service.app import create_app
from service.settings import Settings
from tests.conftest import ServerThread

KEYS = "search-key-one, search-key-two"
ADMIN = "admin-key-0"
TEXT = {"index": "demo", "query": {"text": "a satellite photographs a comet"}, "k": 2}
# (method, path, body): one request per search-side route
GUARDED = [
    ("POST", "/v1/search", TEXT),
    ("POST", "/v1/embeddings", {"input": "a red circle"}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/indexes", None),
    ("GET", "/v1/indexes/demo", None),
    ("GET", "/v1/indexes/demo/media?id=doc-00001", None),
    ("GET", "/v1/indexes/demo/thumbnail?id=doc-00001", None),
    ("GET", "/v1/indexes/demo/waveform?id=doc-00001", None),
    ("POST", "/knn-service", {"text": "a comet", "indice_name": "demo", "modality": "text", "num_images": 2}),
    ("GET", "/indices-list", None),
    ("POST", "/metadata", {"ids": [], "indice_name": "demo"}),
]


@pytest.fixture(scope="module")
def client(served_data: Path):
    settings = Settings(data_dir=served_data, reload_interval_s=0, api_keys=KEYS, admin_keys=ADMIN)
    with TestClient(create_app(settings)) as c:
        yield c


def call(client: TestClient, method: str, path: str, body: dict | None, key: str | None = None, header="bearer"):
    headers = {}
    if key is not None:
        headers = {"Authorization": f"Bearer {key}"} if header == "bearer" else {"X-API-Key": key}
    return client.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize(("method", "path", "body"), GUARDED, ids=[p for _, p, _ in GUARDED])
def test_search_side_routes_need_a_valid_key(client: TestClient, method: str, path: str, body: dict | None) -> None:
    missing = call(client, method, path, body)
    assert missing.status_code == 401, missing.text
    assert missing.json()["error"]["code"] == "unauthorized" and missing.headers["www-authenticate"] == "Bearer"
    wrong = call(client, method, path, body, "search-key-three")
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden", wrong.text
    assert "search-key" not in wrong.text
    for key, header in (("search-key-one", "bearer"), ("search-key-two", "x-api-key"), (ADMIN, "bearer")):
        r = call(client, method, path, body, key, header)
        assert r.status_code not in (401, 403), (key, r.text)  # the media routes then say 404: demo has no media


def test_file_search_needs_a_key(client: TestClient, served_data: Path) -> None:
    form = {"index": "demo", "k": "2"}
    files = {"file": ("x.png", b"not a png", "image/png")}
    assert client.post("/v1/search/file", data=form, files=files).status_code == 401
    r = client.post("/v1/search/file", data=form, files=files, headers={"Authorization": "Bearer search-key-one"})
    assert r.status_code == 400, r.text  # past the key: the bytes are no image


def test_no_body_is_read_without_a_key(client: TestClient) -> None:
    # refused before parsing: malformed JSON and a multipart upload are a 401 too, not a 400 / 415
    bad = client.post("/v1/search", content=b"{nope", headers={"content-type": "application/json"})
    assert bad.status_code == 401
    upload = client.post("/v1/search/file", data={"index": "demo"}, files={"file": ("x.png", b"x" * 10_000)})
    assert upload.status_code == 401
    assert client.get("/v1/a-route-added-later").status_code == 401  # every path is guarded unless listed open


def test_probes_metrics_docs_and_page_stay_open(client: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/", "/docs", "/openapi.json", "/static/app.js"):
        assert client.get(path).status_code == 200, path
    ok = call(client, "POST", "/v1/search", TEXT, "search-key-one")
    assert ok.status_code == 200 and len(ok.json()["results"]) == 2


def test_the_openapi_schema_documents_the_keys(client: TestClient, served_data: Path) -> None:
    schema = client.get("/openapi.json").json()
    scheme = schema["components"]["securitySchemes"]["apiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    search = schema["paths"]["/v1/search"]["post"]
    assert search["security"] == [{"apiKey": []}] and {"401", "403"} <= set(search["responses"])
    assert "security" not in schema["paths"]["/healthz"]["get"]
    with TestClient(create_app(Settings(data_dir=served_data, reload_interval_s=0))) as open_client:
        assert "securitySchemes" not in open_client.get("/openapi.json").json().get("components", {})


def test_admin_routes_keep_their_own_keys(client: TestClient) -> None:
    # a search key is not an admin key: a key sent but not accepted here, as a wrong key is on search routes
    r = client.get("/v1/jobs", headers={"Authorization": "Bearer search-key-one"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
    assert "search-key" not in r.text
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200


@pytest.mark.parametrize("api_keys", [KEYS, ""], ids=["search keys set", "search keys unset"])
def test_a_wrong_key_is_403_and_no_key_401_on_search_and_admin_routes_alike(served_data: Path, api_keys: str) -> None:
    settings = Settings(data_dir=served_data, reload_interval_s=0, api_keys=api_keys, admin_keys=ADMIN)
    admin = ("POST", "/v1/indexes/demo/compact", None)
    routes = [admin, ("POST", "/v1/search", TEXT)] if api_keys else [admin]
    with TestClient(create_app(settings)) as c:
        for method, path, body in routes:
            missing = call(c, method, path, body)
            assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized", path
            assert missing.headers["www-authenticate"] == "Bearer"
            wrong = call(c, method, path, body, "not-a-key", header="x-api-key")
            assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden", (path, wrong.text)
            assert "www-authenticate" not in wrong.headers and "not-a-key" not in wrong.text


def test_admin_keys_are_checked_before_the_body_is_read(served_data: Path) -> None:
    """No search keys set: only the admin gate stands in front of the admin routes. A request without an admin key
    that announces a body at the size limit and sends none of it is answered at once (nothing waits for the body);
    malformed JSON without a key is a 401 or 403, never a 400 or 422 (nothing parsed it)."""
    settings = Settings(data_dir=served_data, reload_interval_s=0, admin_keys=ADMIN)
    with ServerThread(settings) as server:
        for key, status in ((None, 401), ("wrong", 403), ("anything", 403)):
            headers = "" if key is None else f"Authorization: Bearer {key}\r\n"
            head = (
                f"POST /v1/indexes/demo/items HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}"
                f"Content-Length: {settings.max_body_bytes}\r\n\r\n"
            )
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
                raw.sendall(head.encode() + b'{"items": [')  # a first chunk; the rest never comes
                t0 = time.monotonic()
                answer = raw.recv(65536).decode()
                assert time.monotonic() - t0 < 5
            assert answer.startswith(f"HTTP/1.1 {status} "), answer[:200]
        with httpx.Client(base_url=server.url, timeout=30) as c:
            bad = c.post("/v1/indexes/demo/items", content=b"{nope", headers={"content-type": "application/json"})
            assert bad.status_code == 401, bad.text
            good = c.post(
                "/v1/indexes/demo/items",
                content=b"{nope",
                headers={"X-API-Key": ADMIN, "content-type": "application/json"},
            )
            assert good.status_code == 400 and good.json()["error"]["code"] == "malformed_json"  # past the gate
            assert c.get("/v1/jobs/abc").status_code == 401  # GET admin routes too
            assert c.get("/v1/indexes/demo").status_code == 200  # search side: open without search keys


def test_admin_routes_are_off_without_admin_keys_before_the_body(served_data: Path) -> None:
    with TestClient(create_app(Settings(data_dir=served_data, reload_interval_s=0))) as c:
        r = c.post("/v1/indexes/demo/items", content=b"{nope", headers={"X-API-Key": ADMIN})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled", r.text
        assert "XMODAL_ADMIN_KEYS" in r.json()["error"]["message"]


def test_search_is_open_without_keys(served_data: Path) -> None:
    with TestClient(create_app(Settings(data_dir=served_data, reload_interval_s=0))) as c:
        assert c.post("/v1/search", json=TEXT).status_code == 200
        assert c.post("/v1/search", json=TEXT, headers={"Authorization": "Bearer anything"}).status_code == 200


def test_keys_are_never_logged(served_data: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(data_dir=served_data, reload_interval_s=0, api_keys=KEYS, admin_keys=ADMIN)
    assert "search-key" not in repr(settings) and ADMIN not in repr(settings)
    with caplog.at_level(logging.DEBUG), TestClient(create_app(settings)) as c:
        call(c, "POST", "/v1/search", TEXT, "search-key-wrong")
        call(c, "POST", "/v1/search", TEXT, "search-key-one")
    assert "search-key" not in caplog.text and ADMIN not in caplog.text


@pytest.mark.slow
def test_the_openai_client_with_api_key(served_data: Path) -> None:
    openai = pytest.importorskip("openai", reason="the openai client is in the `dev` extra")
    settings = Settings(data_dir=served_data, reload_interval_s=0, api_keys=KEYS)
    with ServerThread(settings) as server:
        good = openai.OpenAI(base_url=f"{server.url}/v1", api_key="search-key-two", max_retries=0)
        assert [m.id for m in good.models.list().data] == [DEFAULT_MODEL]
        assert len(good.embeddings.create(model=DEFAULT_MODEL, input="a red circle").data[0].embedding) == 384
        wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-a-key", max_retries=0)
        with pytest.raises(openai.PermissionDeniedError, match="not valid"):
            wrong.embeddings.create(model=DEFAULT_MODEL, input="a red circle")
