"""Request bodies share a memory budget (XMODAL_BODY_MEMORY_MB, service.middleware.BodyBudget), against the real app
over real HTTP: a body whose copies would not fit the budget is refused (413) before a byte of it is read, one that
must wait for another to finish gets 429 after XMODAL_DECODE_WAIT_S, the memory comes back when an answer is sent,
and small bodies never wait."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx

from tests.service.test_admission import raw_request, search_body, server
from tests.service.test_batching import metric, wait_for

MB = 1 << 20


def answer(s: socket.socket) -> tuple[int, dict]:
    """The status and JSON body of the answer on ``s`` (Content-Length framed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, "the connection closed without an answer"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += s.recv(65536)
    return int(head.split(b" ", 2)[1]), json.loads(body)


def big_search(megabytes: float) -> bytes:
    """A search body of about ``megabytes`` MB (its text over the length limit: answered 400 once read)."""
    return json.dumps({"index": "demo", "query": {"text": "a" * int(megabytes * MB)}}).encode()


def test_large_bodies_share_a_memory_budget(served_data: Path) -> None:
    with (
        server(served_data, body_memory_mb=20, decode_wait_s=0.5) as srv,
        httpx.Client(base_url=srv.url, timeout=60) as c,
    ):
        # 8 MB x 3 copies is over 20 MB: refused from its Content-Length, the body never sent
        with raw_request(srv.port, "/v1/search", big_search(8), send_body=False) as s:
            status, body = answer(s)
        assert status == 413 and "XMODAL_BODY_MEMORY_MB" in body["error"]["message"], body
        # 5 MB x 3 fits once: a second such body waits for the first, then is told to come back
        first_body = big_search(5)
        with raw_request(srv.port, "/v1/search", first_body, send_body=False) as first:
            wait_for(lambda: metric(c, "xmodal_body_memory_bytes") == 3 * len(first_body))
            assert c.post("/v1/search", json=search_body("small bodies pass")).status_code == 200
            with raw_request(srv.port, "/v1/search", big_search(5), send_body=False) as second:
                status, body = answer(second)
            assert status == 429 and "request bodies is busy" in body["error"]["message"], body
            first.sendall(first_body)
            status, body = answer(first)
            assert status == 400 and body["error"]["param"] == "query.text", body  # read, checked, answered
        wait_for(lambda: metric(c, "xmodal_body_memory_bytes") == 0)
        # once given back, the next large body is read at once
        with raw_request(srv.port, "/v1/search", big_search(5)) as again:
            assert answer(again)[0] == 400
