"""Request ids and structured logs through the real app: the client's sane X-Request-ID comes back (else a new id),
on every answer, errors included; and every log line of a request, JSON with XMODAL_LOG_FORMAT=json, carries it:
an error logged while serving, the request's access line, an unhandled error's traceback (once, under uvicorn as
`xmodal serve` runs it, with a JSON 500 and the keep-alive connection closed cleanly), the lines logged in the
threads that decode its files; the encoder lanes, which serve every request, carry none."""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import threading
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.app import create_app
from service.logs import configure_logging
from service.serving import serving_options
from service.settings import Settings
from tests.conftest import ServerThread, free_port
from tests.service.log_records import Records
from tests.service.test_metrics import png_b64

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


class ServedAsInProduction(ServerThread):
    """``app`` under uvicorn with the options `xmodal serve` gives it (service.serving): uvicorn's own lines go
    through the service's log handler, as in production."""

    def __init__(self, app: FastAPI, settings: Settings) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, **serving_options(settings)))
        self.thread = threading.Thread(target=self.server.run, daemon=True)


@pytest.fixture
def uvicorn_loggers():
    """uvicorn's loggers as they were, afterwards (its log config changes them for the whole process)."""
    loggers = [logging.getLogger(n) for n in ("uvicorn", "uvicorn.error", "uvicorn.access")]
    saved = [(lg.handlers[:], lg.level, lg.propagate, lg.disabled) for lg in loggers]
    yield
    for lg, (handlers, level, propagate, disabled) in zip(loggers, saved, strict=True):
        lg.handlers[:], lg.level, lg.propagate, lg.disabled = handlers, level, propagate, disabled


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection: an orderly close ends with b"" (a reset raises
    ConnectionResetError, a connection left open times out)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_500_under_uvicorn_is_json_closes_the_connection_cleanly_and_logs_once(
    served_data: Path, json_logs, uvicorn_loggers
) -> None:
    settings = Settings(data_dir=served_data, reload_interval_s=0)
    app = create_app(settings)

    @app.get("/boom")
    async def boom() -> None:  # a route of the test's own: a bug, as a real one would raise
        raise RuntimeError("a bug")

    with ServedAsInProduction(app, settings) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            # HTTP/1.1: keep-alive unless said otherwise
            sock.sendall(b"GET /boom HTTP/1.1\r\nHost: x\r\nX-Request-ID: req-boom\r\n\r\n")
            raw = read_to_eof(sock)
        head, body = raw.split(b"\r\n\r\n", 1)
        status, *header_lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in header_lines)
        assert status == "HTTP/1.1 500 Internal Server Error"
        assert headers["connection"] == "close" and headers["x-request-id"] == "req-boom"
        assert headers["content-type"] == "application/json" and int(headers["content-length"]) == len(body)
        assert json.loads(body)["error"]["code"] == "internal_error"
        assert httpx.get(f"{srv.url}/healthz", timeout=10).status_code == 200  # the next connection is served
    lines = json_logs()
    tracebacks = [x for x in lines if "RuntimeError: a bug" in x.get("exc", "")]
    assert [(x["logger"], x["message"], x["request_id"]) for x in tracebacks] == [
        ("service.errors", "unhandled error", "req-boom")
    ]
    assert not [x for x in lines if "Exception in ASGI application" in x["message"]]
    assert any(x["logger"] == "uvicorn.error" for x in lines)  # uvicorn's lines do reach this log


def test_decoding_threads_carry_the_request_id_and_encoder_lanes_none(served_data: Path) -> None:
    # Pillow logs each PNG chunk it reads at DEBUG: lines written in the thread that decodes the query's image
    with (
        Records({"PIL": logging.DEBUG, "service.batcher": logging.DEBUG}) as logs,
        ServerThread(Settings(data_dir=served_data, reload_interval_s=0)) as srv,
        httpx.Client(base_url=srv.url, timeout=60) as c,
    ):
        for rid, seed in (("req-img-1", 1), ("req-img-2", 2)):
            query = {"index": "demo", "query": {"image": png_b64(seed)}, "k": 1}
            r = c.post("/v1/search", json=query, headers={"X-Request-ID": rid})
            assert r.status_code == 200, r.text
    # the loop's executor (asyncio_N, uvloop_N) decodes; the header is read in Starlette's pool (AnyIO worker thread)
    decoding = [r for r in logs.of("PIL") if r.threadName.startswith(("asyncio_", "uvloop_"))]
    assert decoding and {r.request_id for r in decoding} == {"req-img-1", "req-img-2"}
    # the image lane started within req-img-1, yet its lines are no request's
    (started,) = [r for r in logs.of("service.batcher") if "lane image of model" in r.getMessage()]
    assert started.request_id is None and started.threadName == srv.thread.name
