"""Caches: the in-process LRU and the circuit breaker (units), and Redis with a real redis-server:
keys and TTLs as designed, and fail-open behaviour when Redis dies while the service runs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.cache import ENTRY_OVERHEAD, CircuitBreaker, LocalCache, RedisCache, embedding_key, result_key
from service.settings import Settings


def test_keys_follow_the_design() -> None:
    k = embedding_key("ab" * 32, "text", b"hello")
    assert k.startswith("xmodal:emb:" + "ab" * 16 + ":text:") and len(k.rsplit(":", 1)[1]) == 64
    r1 = result_key("demo", "v1", {"k": 5, "query": {"text": "a"}})
    assert r1 == result_key("demo", "v1", {"query": {"text": "a"}, "k": 5})  # canonical: key order does not matter
    assert r1 != result_key("demo", "v2", {"k": 5, "query": {"text": "a"}})  # a new version, new keys
    assert r1.startswith("xmodal:res:demo:v1:")


def test_local_cache_lru_and_ttl() -> None:
    async def run() -> None:
        c = LocalCache(max_bytes=2 * (1 + ENTRY_OVERHEAD))  # room for two one-byte values
        await c.set("a", b"1", 60)
        await c.set("b", b"2", 60)
        assert await c.get("a") == b"1"  # a is now the most recently used
        await c.set("c", b"3", 60)
        assert await c.get("b") is None and await c.get("a") == b"1" and await c.get("c") == b"3"
        await c.set("short", b"x", 0.05)
        await asyncio.sleep(0.1)
        assert await c.get("short") is None

    asyncio.run(run())


def test_local_cache_is_bounded_in_bytes() -> None:
    """4,000 distinct large results (k=1000 answers are ~200 KB each) must not grow memory past the budget."""

    async def run() -> None:
        c = LocalCache(max_bytes=10 << 20)
        for i in range(4000):
            await c.set(f"k{i}", bytes(200_000), 60)
        assert c.status()["bytes"] <= 10 << 20 and c.status()["entries"] == (10 << 20) // (200_000 + ENTRY_OVERHEAD)
        assert await c.get("k3999") is not None and await c.get("k0") is None  # the newest kept, the oldest gone
        await c.set("huge", bytes(11 << 20), 60)  # larger than the whole budget: not kept, nothing evicted for it
        assert await c.get("huge") is None and await c.get("k3999") is not None

    asyncio.run(run())


def test_circuit_breaker_opens_then_half_opens() -> None:
    now = [0.0]
    b = CircuitBreaker(failures=2, cooldown_s=5, clock=lambda: now[0])
    assert b.allow() and b.state == "closed"
    b.failure()
    assert b.allow()
    b.failure()
    assert b.state == "open" and not b.allow()
    now[0] = 4.9
    assert not b.allow()
    now[0] = 5.1
    assert b.allow()  # half-open: one trial goes through...
    assert not b.allow()  # ...and the others keep bypassing until it reports
    b.failure()
    assert b.state == "open"
    now[0] = 10.3
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow()


def test_redis_cache_against_a_real_server(redis_server) -> None:
    async def run() -> None:
        c = RedisCache(redis_server.url, timeout_s=0.2, breaker=CircuitBreaker(3, 1.0))
        await c.set("xmodal:test", b"value", 30)
        assert await c.get("xmodal:test") == b"value"
        assert await c.get("xmodal:absent") is None
        await c.close()

    asyncio.run(run())
    ttl = redis.Redis.from_url(redis_server.url).ttl("xmodal:test")
    assert 0 < ttl <= 30


def test_service_caches_in_redis_and_fails_open(served_data: Path, redis_server, monkeypatch) -> None:
    settings = Settings(
        data_dir=served_data,
        reload_interval_s=0,
        redis_url=redis_server.url,
        breaker_failures=2,
        breaker_cooldown_s=0.5,
        redis_timeout_s=0.2,
    )
    direct = redis.Redis.from_url(redis_server.url)
    with TestClient(create_app(settings)) as client:
        body = {"index": "demo", "query": {"text": "the drummer records an album"}, "k": 3}
        first = client.post("/v1/search", json=body).json()
        assert first["cached"] is False
        assert client.post("/v1/search", json=body).json()["cached"] is True
        keys = sorted(k.decode() for k in direct.keys("xmodal:*"))
        assert [k.split(":")[1] for k in keys] == ["emb", "res"]
        res_key = next(k for k in keys if k.startswith("xmodal:res:demo:" + first["index_version"] + ":"))
        assert 0 < direct.ttl(res_key) <= settings.result_ttl_s
        emb_key = next(k for k in keys if k.startswith("xmodal:emb:"))
        assert len(direct.get(emb_key)) == 384 * 4 and 0 < direct.ttl(emb_key) <= settings.embedding_ttl_s
        assert client.get("/readyz").json()["cache"] == {"backend": "redis", "circuit": "closed", "errors": 0}

        # Redis dies while the service runs: every request still succeeds, uncached and fast.
        redis_server.stop()
        for i in range(6):
            t0 = time.perf_counter()
            r = client.post("/v1/search", json=body | {"k": 4 + i})
            assert r.status_code == 200 and r.json()["cached"] is False
            assert len(r.json()["results"]) == 4 + i
            assert time.perf_counter() - t0 < 2.0
        assert client.post("/v1/search", json=body).json()["cached"] is False  # was cached, Redis is gone
        status = client.get("/readyz").json()["cache"]
        assert status["errors"] >= 2 and status["circuit"] in ("open", "half-open")

        # Redis comes back (empty, on the same port): after the cool-down caching resumes.
        redis_server.start()
        time.sleep(0.6)
        client.post("/v1/search", json=body)
        deadline = time.monotonic() + 10
        while client.post("/v1/search", json=body).json()["cached"] is not True:
            assert time.monotonic() < deadline, "caching did not resume after Redis came back"
            time.sleep(0.2)
        assert client.get("/readyz").json()["cache"]["circuit"] == "closed"


def test_redis_url_from_either_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://example:1/0")
    assert Settings().redis_url == "redis://example:1/0"
    monkeypatch.setenv("XMODAL_REDIS_URL", "redis://other:2/0")
    assert Settings().redis_url == "redis://other:2/0"


def test_published_version_is_announced_to_running_replicas(
    tmp_path: Path, served_data: Path, redis_server, encoder, demo_corpus: Path
) -> None:
    """Polling off: only the Redis announcement can make the service swap to the new version."""
    import shutil

    from indexer.build import build_index
    from indexer.corpus import read_jsonl
    from service.events import CHANNEL, announce

    data = tmp_path / "data"
    shutil.copytree(served_data, data)
    settings = Settings(data_dir=data, reload_interval_s=0, redis_url=redis_server.url)
    direct = redis.Redis.from_url(redis_server.url)
    body = {"index": "demo", "query": {"text": "a nurse and a patient"}, "k": 2}
    with TestClient(create_app(settings)) as client:
        old = client.post("/v1/search", json=body).json()["index_version"]
        deadline = time.monotonic() + 10
        while direct.pubsub_numsub(CHANNEL)[0][1] < 1:  # the app's listener has subscribed
            assert time.monotonic() < deadline
            time.sleep(0.05)
        new = build_index(
            indexes_dir=data / "indexes",
            name="demo",
            items=read_jsonl(demo_corpus)[:50],
            encoder=encoder,
            use_gpu=False,
        ).manifest.version
        time.sleep(0.3)
        assert client.post("/v1/search", json=body).json()["index_version"] == old  # no polling: not yet
        assert announce(redis_server.url, "demo", new) == 1
        while client.post("/v1/search", json=body).json()["index_version"] != new:
            assert time.monotonic() < deadline, "the announcement did not swap the version"
            time.sleep(0.05)
    redis_server.stop()
    assert announce(redis_server.url, "demo", new) is None  # Redis down: publishing still succeeds, no raise


@pytest.mark.slow
def test_redis_stopped_under_load_fails_no_request(served_data: Path, redis_server) -> None:
    """8 clients searching over real HTTP (a mix of repeated and new queries) while Redis is stopped and started
    again: not one request fails, and once Redis is back repeated queries are answered from it again."""
    import threading

    import httpx

    from tests.conftest import ServerThread

    settings = Settings(
        data_dir=served_data,
        reload_interval_s=0,
        redis_url=redis_server.url,
        breaker_failures=2,
        breaker_cooldown_s=0.5,
        redis_timeout_s=0.2,
    )
    texts = ["a storm at sea", "the chef bakes bread", "a goal in the match", "a rocket launch"]
    outcomes: list[tuple[int, bool]] = []
    stop = threading.Event()

    def client(n: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            i = n
            while not stop.is_set():
                text = texts[i % len(texts)] if i % 2 else f"{texts[i % len(texts)]} {i}"  # repeated, and new
                r = http.post("/v1/search", json={"index": "demo", "query": {"text": text}, "k": 5})
                outcomes.append((r.status_code, r.status_code == 200 and r.json()["cached"]))
                i += 8

    with ServerThread(settings) as server:
        threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        time.sleep(2)
        redis_server.stop()  # mid-load
        time.sleep(3)
        during = len(outcomes)
        redis_server.start()
        time.sleep(4)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert outcomes and all(status == 200 for status, _ in outcomes), sorted({s for s, _ in outcomes})
    assert any(cached for _, cached in outcomes[:during]) and any(cached for _, cached in outcomes[during + 20 :])
