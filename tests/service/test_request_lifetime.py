"""A request's lifetime counts from its arrival, on every route that encodes: the deadline
(XMODAL_REQUEST_TIMEOUT_S) starts when the request's headers arrive, not when its route runs, so a client that
trickles its body uses up its own time; and a client that hangs up has its queries dropped from the encoder's queue,
through /knn-service as through /v1/search. Real uvicorn, raw sockets, the real encoder."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from tests.conftest import ServerThread
from tests.service.test_batching import dropped, long_texts, metric, wait_for

TIMEOUT_S = 2.0


def body_for(path: str, text: str) -> dict:
    if path == "/knn-service":
        return {"text": text, "indice_name": "demo", "modality": "text", "num_images": 3}
    return {"index": "demo", "query": {"text": text}, "k": 3}


def send_slowly(port: int, path: str, body: bytes, seconds: float) -> tuple[int, dict]:
    """POST ``body`` over a raw socket, its bytes spread over ``seconds`` (headers at once); the status and JSON."""
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        raw.sendall(head.encode())
        pieces = 10
        step = -(-len(body) // pieces)
        for i in range(0, len(body), step):
            time.sleep(seconds / pieces)
            raw.sendall(body[i : i + step])
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < content_length(answer):
            chunk = raw.recv(65536)
            if not chunk:
                break
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, json.loads(answer.split(b"\r\n\r\n", 1)[1])


def content_length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@pytest.mark.parametrize("path", ["/v1/search", "/knn-service"])
def test_the_deadline_counts_from_arrival_not_from_the_route(served_data: Path, path: str) -> None:
    settings = Settings(data_dir=served_data, reload_interval_s=0, request_timeout_s=TIMEOUT_S)
    with ServerThread(settings) as server:
        # sent at once, a fresh query (no cache answers it) is encoded well within the timeout
        status, answer = send_slowly(server.port, path, json.dumps(body_for(path, "a comet over the sea")).encode(), 0)
        assert status == 200, answer
        # its body trickled over longer than the timeout: past its deadline before its query reaches the encoder
        slow = json.dumps(body_for(path, "a lighthouse in a storm")).encode()
        status, answer = send_slowly(server.port, path, slow, 1.5 * TIMEOUT_S)
        assert status == 503 and answer["error"]["code"] == "deadline_exceeded", (status, answer)
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert metric(c, "xmodal_batch_dropped_total", lane="text", reason="deadline") == 1


def test_a_knn_client_that_hangs_up_leaves_the_queue_unencoded(served_data: Path) -> None:
    body = json.dumps(body_for("/knn-service", "nobody waits for this answer either")).encode()
    head = f"POST /knn-service HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"  # no content type: as ClipClient
    settings = Settings(data_dir=served_data, reload_interval_s=0, batch_max=8, request_timeout_s=60)
    with ServerThread(settings) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        with ThreadPoolExecutor(1) as pool:
            ahead = pool.submit(c.post, "/v1/embeddings", json={"input": long_texts(32)})  # 4 batches ahead of it
            wait_for(lambda: metric(c, "xmodal_batch_size_count", lane="text") >= 1)
            with socket.create_connection(("127.0.0.1", srv.port)) as raw:
                raw.sendall(head.encode() + b"\r\n" + body)
                # its query missed the embedding cache: it is on its way to the queue, behind the long texts
                wait_for(lambda: metric(c, "xmodal_cache_lookups_total", kind="embedding", outcome="miss") == 33)
                time.sleep(0.1)
            assert ahead.result().status_code == 200
        wait_for(lambda: dropped(c, "cancelled") == 1)
        assert metric(c, "xmodal_batch_size_sum", lane="text") == 32  # the long texts only
        assert metric(c, "xmodal_http_requests_total", path="/knn-service", status="499") == 1
