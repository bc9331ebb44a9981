"""Admission control (service/admission.py) against the real app over real HTTP (uvicorn in a thread) and the real
ONNX encoder: when the encoder is stuck, requests past the limit get 429 with a spread Retry-After at once (before
their body is read) while the admitted ones finish; the limit recovers once the load is gone; a client slow to send
its body holds no place; a burst of many real clients gets only 200s and 429s. Then the limit's arithmetic on its
own, with a clock the test moves (behaviour, not timing)."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from service.admission import BURST, QUIET_S, STANDING_S, Admission, Ticket, charge
from service.settings import Settings
from tests.conftest import ServerThread
from tests.service.test_batching import at_once, metric, wait_for


def server(data: Path, **overrides) -> ServerThread:
    return ServerThread(Settings(data_dir=data, reload_interval_s=0, **overrides))


def search_body(text: str) -> dict:
    return {"index": "demo", "query": {"text": text}, "k": 3}


def check_refusal(r: httpx.Response) -> int:
    """A 429 from admission: the error shape, and a retry delay in 1-3 s, in ms and in whole seconds (rounded)."""
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["code"] == "overloaded" and error["type"] == "rate_limit_error", error
    ms = int(r.headers["retry-after-ms"])
    assert 1000 <= ms <= 3000 and r.headers["retry-after"] == str(max(1, round(ms / 1000)))
    assert error["details"]["retry_after_ms"] == ms
    return ms


class Stall:
    """A stuck encoder: every thread of the batcher's pool busy until ``release()``, so no batch runs."""

    def __init__(self, srv: ServerThread) -> None:
        self.executor = srv.server.config.app.state.xmodal.registry.model(None).batcher.executor
        self.gate = threading.Event()

    def __enter__(self) -> Stall:
        self.jobs = [self.executor.submit(self.gate.wait) for _ in range(self.executor._max_workers)]
        return self

    def release(self) -> None:
        self.gate.set()

    def __exit__(self, *exc: object) -> None:
        self.release()


def raw_request(port: int, path: str, body: bytes, send_body: bool = True) -> socket.socket:
    """A POST on a socket of its own (headers, then the body or none of it yet)."""
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(head.encode() + (body if send_body else b""))
    return s


def read_status(s: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = s.recv(4096)
        assert chunk, "the connection closed without an answer"
        data += chunk
    return int(data.split(b" ", 2)[1])


def test_a_stuck_encoder_sheds_at_once_while_admitted_requests_finish_and_the_limit_recovers(
    served_data: Path,
) -> None:
    settings = {"min_inflight": 4, "queue_target_ms": 200, "request_timeout_s": 120}
    with server(served_data, **settings) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        for i in range(20):  # the throughput is measured
            assert c.post("/v1/search", json=search_body(f"warm up {i}")).status_code == 200
        wait_for(lambda: metric(c, "xmodal_admission_throughput") > 0)
        assert metric(c, "xmodal_admission_shedding") == 0
        with Stall(srv) as stall, ThreadPoolExecutor(6) as pool:
            stuck = [pool.submit(c.post, "/v1/search", json=search_body(f"stuck {i}")) for i in range(6)]
            wait_for(lambda: metric(c, "xmodal_search_inflight") == 6)  # a burst: all admitted
            # nothing finishes: the throughput falls, a standing queue is seen, the limit falls to its floor
            wait_for(lambda: metric(c, "xmodal_admission_shedding") == 1)
            refused = [c.post("/v1/search", json=search_body(f"refused {i}")) for i in range(5)]
            assert len({check_refusal(r) for r in refused}) > 1, "refused together, told to come back together"
            # the other routes that encode are gated too; the rest of the API is not
            check_refusal(c.post("/v1/embeddings", json={"input": "more"}))
            check_refusal(c.post("/knn-service", json={"text": "more", "indice_name": "demo"}))
            assert c.get("/v1/indexes").status_code == 200 and c.get("/healthz").status_code == 200
            # refused before its body is read: the answer comes while no byte of the body has been sent
            with raw_request(srv.port, "/v1/search", json.dumps(search_body("never sent")).encode(), False) as s:
                assert read_status(s) == 429
            assert not any(f.done() for f in stuck)  # all this while, the admitted ones were waiting
            stall.release()
            answers = [f.result() for f in stuck]
        assert [a.status_code for a in answers] == [200] * 6, [a.text[:200] for a in answers]
        assert metric(c, "xmodal_admission_shed_total", stage="arrival") == 8
        assert metric(c, "xmodal_http_requests_total", path="/v1/search", status="429") == 6  # counted by route
        assert metric(c, "xmodal_admission_seconds_count") == 26  # every admitted request, to its answer

        # the load is gone: shedding stops once nothing is refused for a while, and bursts are let in again
        n = iter(range(10**6))

        def recovered() -> bool:
            assert c.post("/v1/search", json=search_body(f"after {next(n)}")).status_code == 200
            return metric(c, "xmodal_admission_shedding") == 0 and metric(c, "xmodal_admission_limit") >= 8

        wait_for(recovered)
        burst = at_once(8, lambda i: c.post("/v1/search", json=search_body(f"burst {i}")))
        assert [r.status_code for r in burst] == [200] * 8


def test_refusals_on_arrival_leave_keys_and_draining_to_the_layers_inside(served_data: Path) -> None:
    """The front door answers 429 before FastAPI runs, but not to a request the layers inside answer otherwise: no
    key or a wrong one (401/403 when keys are set), and any request while the service drains (503)."""
    settings = {"max_inflight": 1, "min_inflight": 1, "api_keys": "search-key", "request_timeout_s": 120}
    key = {"authorization": "Bearer search-key"}
    with server(served_data, **settings) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        with Stall(srv) as stall, ThreadPoolExecutor(1) as pool:
            stuck = pool.submit(c.post, "/v1/search", json=search_body("the one place"), headers=key)
            wait_for(lambda: metric(c, "xmodal_search_inflight") == 1)
            assert c.post("/v1/search", json=search_body("no key")).status_code == 401
            wrong = c.post("/v1/search", json=search_body("wrong key"), headers={"x-api-key": "nope"})
            assert wrong.status_code == 403
            refused = [c.post("/v1/search", json=search_body(f"full {i}"), headers=key) for i in range(2)]
            for r in refused:
                check_refusal(r)
            ids = [r.headers["x-request-id"] for r in refused]
            assert len(set(ids)) == 2 and all(ids), ids  # each refusal has an id of its own
            srv.server.config.app.state.drain.draining = True  # what SIGTERM sets (tests/test_drain.py sends one)
            try:
                draining = c.post("/v1/search", json=search_body("while draining"), headers=key)
                assert draining.status_code == 503 and draining.json()["error"]["code"] == "shutting_down"
            finally:
                srv.server.config.app.state.drain.draining = False
            stall.release()
            assert stuck.result().status_code == 200
        assert metric(c, "xmodal_http_requests_total", path="/v1/search", status="429") == 2


def test_a_client_slow_to_send_its_body_holds_no_place(served_data: Path) -> None:
    body = json.dumps(search_body("a slow upload")).encode()
    with (
        server(served_data, max_inflight=1, min_inflight=1) as srv,
        httpx.Client(base_url=srv.url, timeout=60) as c,
        raw_request(srv.port, "/v1/search", body, send_body=False) as slow,
    ):
        slow.sendall(body[:10])  # a tenth of the body, then nothing for now
        time.sleep(0.2)
        assert metric(c, "xmodal_search_inflight") == 0
        assert c.post("/v1/search", json=search_body("meanwhile")).status_code == 200  # the one place was free
        slow.sendall(body[10:])
        assert read_status(slow) == 200


def test_no_5xx_nor_timeout_under_a_burst_of_many_real_clients(served_data: Path) -> None:
    """48 clients, 4 searches each, all at once, against a low limit: each answer is a 200 or a 429 with its
    Retry-After; the service answers normally afterwards."""
    with (
        server(served_data, queue_target_ms=10, min_inflight=2) as srv,
        httpx.Client(base_url=srv.url, timeout=60, limits=httpx.Limits(max_connections=64)) as c,
    ):
        for i in range(10):
            assert c.post("/v1/search", json=search_body(f"warm up {i}")).status_code == 200

        def client(i: int) -> list[httpx.Response]:
            return [c.post("/v1/search", json=search_body(f"client {i} query {j}")) for j in range(4)]

        answers = [r for rs in at_once(48, client) for r in rs]
        codes = [r.status_code for r in answers]
        assert set(codes) <= {200, 429} and codes.count(200) > 0 and codes.count(429) > 0, codes
        for r in answers:
            if r.status_code == 429:
                check_refusal(r)
            else:
                assert len(r.json()["results"]) == 3
        assert c.post("/v1/search", json=search_body("afterwards")).status_code == 200
        assert metric(c, "xmodal_http_requests_total", path="/v1/search", status="500") == 0


# --- the limit on its own, with a clock the test moves ----------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def serve(a: Admission, clock: Clock, per_s: float, seconds: float) -> None:
    """Requests one after another, finishing at ``per_s`` a second, for ``seconds``."""
    for _ in range(round(per_s * seconds)):
        ticket = Ticket()
        assert a.try_acquire(ticket)
        clock.now += 1 / per_s
        a.release(ticket)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def admission(clock: Clock, **kw) -> Admission:
    return Admission(kw.pop("max_inflight", 64), CollectorRegistry(), clock=clock, rng=random.Random(0), **kw)


def hold(a: Admission, n: int) -> Iterator[Ticket]:
    for _ in range(n):
        ticket = Ticket()
        if not a.try_acquire(ticket):
            return
        yield ticket


def test_the_limit_follows_throughput_sheds_a_standing_queue_and_recovers(clock: Clock) -> None:
    a = admission(clock, queue_target_s=0.05, min_inflight=4, burst_min=8)
    assert a.bound == 8  # nothing measured yet: one encoder batch (burst_min), not the ceiling of 64
    serve(a, clock, per_s=200, seconds=1)
    assert a.throughput == pytest.approx(200, rel=0.05)
    assert a.bound == int(a.throughput * 0.05 * BURST)  # a burst may take what drains in 250 ms: ~50
    burst = list(hold(a, 64))
    assert len(burst) == a.bound and a.full()  # the burst is let in up to that, the rest refused
    # nothing finishes (a stuck encoder): a standing queue, then the bound falls with the throughput
    for _ in range(10):  # 2 s
        clock.now += STANDING_S
        assert a.full()
    assert a.shedding and a.bound < 4 and a.throughput < 50
    for ticket in burst:
        a.release(ticket)
    # the load fits again: a few requests at a time are never refused (min_inflight), nothing else is refused
    for ticket in hold(a, 3):
        a.release(ticket)
    clock.now += QUIET_S
    serve(a, clock, per_s=200, seconds=1)
    assert not a.shedding and a.bound >= 4 * BURST  # bursts are let in again


def test_an_idle_service_lets_in_a_burst_of_one_batch(clock: Clock) -> None:
    """A throughput measured one request at a time says little of what batching does with a burst."""
    a = admission(clock, queue_target_s=0.05, min_inflight=2, burst_min=32)
    serve(a, clock, per_s=100, seconds=1)  # one at a time: 100/s, so 150 ms hold 15
    assert len(list(hold(a, 64))) == 32


def test_under_overload_the_bound_is_throughput_times_the_target(clock: Clock) -> None:
    a = admission(clock, queue_target_s=0.05, min_inflight=2, burst_min=8)
    serve(a, clock, per_s=400, seconds=1)
    held = list(hold(a, 64))
    for _ in range(40):  # 2 s of 8x overload: every 50 ms the 20 oldest in flight finish, arrivals fill the places
        clock.now += 0.05
        for ticket in held[:20]:
            a.release(ticket)
        held = held[20:] + list(hold(a, 64))
        assert a.full()
        a.refusal("arrival")  # the arrivals beyond
    assert a.shedding and a.bound == int(a.throughput * 0.05)  # about 400/s x 50 ms
    assert len(held) == a.bound and 10 <= len(held) <= 30


def test_work_counts_queries_not_requests(clock: Clock) -> None:
    a = admission(clock, queue_target_s=0.05, min_inflight=2, burst_min=8)
    serve(a, clock, per_s=200, seconds=1)

    async def heavy() -> None:
        async with a.admit():
            charge(100)  # an embeddings request of 100 texts
            assert a.work == 100 and a.inflight == 1
            async with a.admit():  # nested (a route under the gate): the same place
                assert a.inflight == 1
            light = Ticket()
            assert a.try_acquire(light)  # under min_inflight: a search still gets in
            assert a.full()  # but 101 queries in flight drain in 0.5 s: beyond the 150 ms of a burst
            a.release(light)
            clock.now += 0.25

    asyncio.run(heavy())
    assert a.work == 0 and a.inflight == 0
    serve(a, clock, per_s=200, seconds=0.3)
    assert a.throughput > 200  # the 100 queries count in what was finished


def test_retry_delays_are_spread_and_a_fixed_limit_is_the_ceiling(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    a = admission(clock, max_inflight=3, queue_target_s=0)
    delays = []
    for _ in range(200):
        _message, details, headers = a.refusal("arrival")
        ms = details["retry_after_ms"]
        assert 1000 <= ms <= 3000 and headers["retry-after-ms"] == str(ms)
        assert headers["retry-after"] == str(max(1, round(ms / 1000)))
        delays.append(ms)
    assert len(set(delays)) > 100 and {max(1, round(d / 1000)) for d in delays} == {1, 2, 3}
    serve(a, clock, per_s=1000, seconds=1)
    assert a.throughput == pytest.approx(1000, rel=0.05)  # measured and shown, but the limit stays fixed
    assert len(list(hold(a, 10))) == 3 and a.bound == 3 and a.full()
    clock.now += 11
    a.full()
    assert "200 requests refused (429) in the last 12 s" in caplog.text  # a count, not a line per refusal
