"""Request ids and structured logs through the real app: the client's sane X-Request-ID comes back (else a new id),
on every answer, errors included; and every log line of a request, JSON with XMODAL_LOG_FORMAT=json, carries it:
an error logged while serving, the request's access line, an unhandled error's traceback."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.logs import configure_logging
from service.settings import Settings

TEXT = {"index": "demo", "query": {"text": "a comet"}, "k": 1}
GENERATED = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
def json_logs():
    """The service's JSON log lines, written to a buffer; the root logger as it was afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, {n: logging.getLogger(n).level for n in ("models", "indexer", "service")}
    buffer = io.StringIO()
    configure_logging("json", buffer)
    yield lambda: [json.loads(line) for line in buffer.getvalue().splitlines()]
    root.handlers[:], root.level = saved[0], saved[1]
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture(scope="module")
def client(served_data: Path):
    with TestClient(create_app(Settings(data_dir=served_data, reload_interval_s=0))) as c:
        yield c


def test_a_sane_client_id_comes_back(client: TestClient) -> None:
    for rid in ("abc-123", "7f1c2e9a.retry:2", "A" * 128):
        r = client.post("/v1/search", json=TEXT, headers={"X-Request-ID": rid})
        assert r.status_code == 200 and r.headers["x-request-id"] == rid


def test_other_ids_are_replaced_and_every_answer_has_one(client: TestClient) -> None:
    for bad in ("A" * 129, "two words", "<script>", "é".encode("latin-1"), "a\tb", ""):
        r = client.post("/v1/search", json=TEXT, headers={"X-Request-ID": bad})
        assert GENERATED.fullmatch(r.headers["x-request-id"]), bad
    answers = [client.get("/healthz"), client.get("/v1/indexes/nope"), client.post("/v1/search", json={"k": 1})]
    assert [a.status_code for a in answers] == [200, 404, 422]
    ids = [a.headers["x-request-id"] for a in answers]
    assert all(GENERATED.fullmatch(i) for i in ids) and len(set(ids)) == 3


def test_every_log_line_of_a_request_carries_its_id(tmp_path: Path, json_logs) -> None:
    # No model to load: a search is a 503, which the service logs as an error while answering it.
    with TestClient(create_app(Settings(data_dir=tmp_path, model="absent", reload_interval_s=0))) as c:
        r = c.post("/v1/search", json=TEXT, headers={"X-Request-ID": "req-42"})
        assert r.status_code == 503 and r.headers["x-request-id"] == "req-42"
    lines = json_logs()
    mine = [line for line in lines if line.get("request_id") == "req-42"]
    assert [(x["logger"], x["level"]) for x in mine] == [("service.errors", "ERROR"), ("service.access", "INFO")]
    assert mine[0]["message"].startswith("not_ready: the model is not loaded")
    access = mine[1]
    assert (access["method"], access["path"], access["status"]) == ("POST", "/v1/search", 503)
    assert access["duration_ms"] >= 0 and access["ts"].endswith("+00:00")
    startup = next(x for x in lines if x["logger"] == "service.registry")  # outside a request: no id
    assert "model absent not loaded" in startup["message"] and "request_id" not in startup


def test_an_unhandled_error_answers_and_logs_under_the_id(served_data: Path, json_logs) -> None:
    app = create_app(Settings(data_dir=served_data, reload_interval_s=0))

    @app.get("/boom")
    async def boom() -> None:  # a route of the test's own: a bug, as a real one would raise
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom", headers={"X-Request-ID": "req-500"})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert r.headers["x-request-id"] == "req-500"
    mine = [line for line in json_logs() if line.get("request_id") == "req-500"]
    # the access line first: the 500 handler runs outside the middleware, after it, still under the request's id
    access, error = mine
    assert (access["logger"], access["status"], access["path"]) == ("service.access", 500, "/boom")
    assert error["message"] == "unhandled error" and "RuntimeError: a bug" in error["exc"]
