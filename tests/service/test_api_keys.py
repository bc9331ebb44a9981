"""Search API keys (XMODAL_API_KEYS) through the real app: every search-side route needs a key once keys are set
(401 without, 403 for a wrong one, an admin key passes too); probes, metrics and the page stay open; and the real
`openai` client, given `api_key`, is let in while a wrong key raises its PermissionDeniedError."""

from __future__ import annotations

import logging
from pathlib import Path

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
    # a search key is not an admin key
    r = client.get("/v1/jobs", headers={"Authorization": "Bearer search-key-one"})
    assert r.status_code == 401
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200


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
