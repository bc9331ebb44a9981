"""SIGTERM under load, for real: `xmodal serve` in a subprocess, requests in flight in threads (bodies that trickle
in, so that they are surely in flight when the signal comes, and encodes), then SIGTERM: every request in flight
finishes with its answer, new ones get 503 (readiness too, liveness stays), and the process exits well within
XMODAL_DRAIN_S; and a request that outlives XMODAL_DRAIN_S does not keep the process up (that run also checks the
JSON log lines of a real `xmodal serve`)."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.test_end_to_end import start_serving

pytestmark = pytest.mark.slow
QUERY = json.dumps({"index": "demo", "query": {"text": "a satellite photographs a comet"}, "k": 3}).encode()


def trickle(seconds: float, pieces: int = 10) -> Iterator[bytes]:
    """The search body in ``pieces`` chunks over ``seconds``: the request is in flight all that time."""
    step = -(-len(QUERY) // pieces)
    for i in range(0, len(QUERY), step):
        yield QUERY[i : i + step]
        time.sleep(seconds / pieces)


def slow_search(base: str, seconds: float) -> httpx.Response:
    with httpx.Client(timeout=60) as c:
        return c.post(f"{base}/v1/search", content=trickle(seconds), headers={"content-type": "application/json"})


def encode_many(base: str) -> httpx.Response:
    texts = [f"{i} " + "the orbit of a comet seen from a satellite " * 12 for i in range(128)]
    with httpx.Client(timeout=60) as c:
        return c.post(f"{base}/v1/embeddings", json={"input": texts})


def wait_exit(proc, limit: float) -> float:
    t0 = time.monotonic()
    proc.wait(timeout=limit)
    return time.monotonic() - t0


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(served_data: Path) -> None:
    proc, base = start_serving(served_data, drain_s="30", request_timeout_s="60")  # a shared CI machine is slow
    try:
        with ThreadPoolExecutor(6) as pool:
            slow = [pool.submit(slow_search, base, 3.0) for _ in range(4)]
            encodes = [pool.submit(encode_many, base) for _ in range(2)]
            time.sleep(1.0)  # all of them are in flight: the bodies are still arriving
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with httpx.Client(timeout=10) as c:  # a new client, while the old requests run
                late = c.post(f"{base}/v1/search", content=QUERY, headers={"content-type": "application/json"})
                ready = c.get(f"{base}/readyz")
                alive = c.get(f"{base}/healthz")
            answers = [f.result() for f in slow + encodes]
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down", late.text
        assert late.headers["connection"] == "close" and late.headers["retry-after"] == "1"
        assert ready.status_code == 503 and alive.status_code == 200
        assert [a.status_code for a in answers] == [200] * 6, [a.text[:200] for a in answers]
        assert all(len(a.json()["results"]) == 3 for a in answers[:4])
        assert all(len(a.json()["data"]) == 128 for a in answers[4:])
        waited = wait_exit(proc, 30)
        assert time.monotonic() - t0 < 15, "exits once drained, long before XMODAL_DRAIN_S"
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0]
    assert "draining 6 request(s) in flight" in out and "drained in" in out, out[-2000:]
    assert waited >= 0


def test_a_request_past_the_deadline_does_not_hold_the_process(served_data: Path) -> None:
    proc, base = start_serving(served_data, drain_s="1", log_format="json")
    try:
        with ThreadPoolExecutor(1) as pool:
            stuck = pool.submit(slow_search, base, 20.0)
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            waited = wait_exit(proc, 15)
            try:  # cut at the deadline: a 503 if the client reads it while still sending its body, never a 500
                cut = stuck.result()
                assert cut.status_code == 503 and cut.json()["error"]["code"] == "shutting_down", cut.text
            except httpx.TransportError:
                pass
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0]
    assert waited < 1 + 1 + 2.5, out[-2000:]  # the drain deadline, uvicorn's grace, the lifespan's shutdown
    # XMODAL_LOG_FORMAT=json: every line after the banner is JSON, uvicorn's too; the cut request's has its id
    lines = [json.loads(line) for line in out.splitlines()[1:] if line.strip()]
    said = [line["message"] for line in lines]
    assert "drain deadline (XMODAL_DRAIN_S=1.0) passed with 1 request(s) in flight" in said
    assert any(m.startswith("Started server process") for m in said)  # uvicorn's own line
    cut = next(line for line in lines if line["logger"] == "service.access" and line["path"] == "/v1/search")
    assert (cut["path"], cut["status"]) == ("/v1/search", 503) and len(cut["request_id"]) == 32
