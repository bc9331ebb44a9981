"""Large answers are rendered off the event loop: while the service sends a `/v1/embeddings` answer of token vectors
near XMODAL_MAX_RESPONSE_FLOATS (tens of MB of JSON), `/healthz` keeps answering at once. Real uvicorn, real model.

Rendering that many floats on the loop (FastAPI's encoder, then json.dumps) took seconds here, during which no other
request was answered."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from models.encoder import Encoder
from service.settings import Settings
from tests.conftest import ServerThread

LIMIT = 4_000_000  # XMODAL_MAX_RESPONSE_FLOATS (twice the default): an answer of about 50 MB
TEXT = "the quick brown fox jumps over the lazy dog near the river bank at dawn " * 40  # truncated to the model's most


def poll_healthz(url: str, stop: threading.Event, out: list[tuple[float, float, int]]) -> None:
    """(start, seconds, status) of each /healthz, one after another, until ``stop``."""
    with httpx.Client(base_url=url, timeout=30) as c:
        while not stop.is_set():
            t0 = time.monotonic()
            status = c.get("/healthz").status_code
            out.append((t0, time.monotonic() - t0, status))
            time.sleep(0.005)


def test_healthz_answers_while_a_large_embeddings_answer_is_rendered(served_data: Path, encoder: Encoder) -> None:
    tokens = encoder.count_tokens([TEXT])[0]
    n = LIMIT // ((tokens + 1) * encoder.dim)  # each input: its vector and its token vectors, just under the limit
    body = {"input": [TEXT] * n, "tokens": True}
    assert (tokens + 1) * encoder.dim * n > 0.9 * LIMIT
    settings = Settings(data_dir=served_data, reload_interval_s=0, max_response_floats=LIMIT)
    with ServerThread(settings) as server, httpx.Client(base_url=server.url, timeout=120) as c:
        first = c.post("/v1/embeddings", json=body)  # encodes; the next one is all embedding-cache hits
        assert first.status_code == 200, first.text[:300]
        expected = np.array(first.json()["data"][0]["tokens"], dtype=np.float32)
        assert expected.shape == (tokens, encoder.dim)

        polls: list[tuple[float, float, int]] = []
        stop = threading.Event()
        poller = threading.Thread(target=poll_healthz, args=(server.url, stop, polls))
        poller.start()
        time.sleep(0.2)  # the poller is running
        try:
            t0 = time.monotonic()
            raw = bytearray()
            with c.stream("POST", "/v1/embeddings", json=body) as r:  # read as bytes: no parsing in this process
                assert r.status_code == 200
                for chunk in r.iter_raw():
                    raw += chunk
            t1 = time.monotonic()
            time.sleep(0.1)
        finally:
            stop.set()
            poller.join()
    assert {status for _, _, status in polls} == {200}
    during = [seconds for start, seconds, _ in polls if start <= t1 and start + seconds >= t0]  # overlapping it
    assert len(raw) > 30_000_000  # tens of MB of JSON
    assert len(during) >= 3, (t1 - t0, polls[-5:])
    assert max(during) < 0.25, (
        f"/healthz took up to {max(during):.2f} s while a {len(raw) / 1e6:.0f} MB answer was sent"
    )
    answer = json.loads(raw)
    assert len(answer["data"]) == n
    np.testing.assert_array_equal(np.array(answer["data"][0]["tokens"], dtype=np.float32), expected)
