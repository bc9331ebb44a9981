"""Query-embedding and result caches: Redis when configured, else an in-process LRU.

Redis is an accelerator, never a dependency of a request: every call has a short timeout, and after a
few consecutive failures a circuit breaker bypasses Redis for a cool-down, then lets one call try again
(fail open). A new index version changes every result key, so nothing stale is served.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Protocol

from cachetools import TLRUCache

log = logging.getLogger(__name__)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def embedding_key(fingerprint: str, modality: str, content: bytes) -> str:
    return f"xmodal:emb:{fingerprint[:32]}:{modality}:{sha256_hex(content)}"


def result_key(index: str, version: str, request: dict) -> str:
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return f"xmodal:res:{index}:{version}:{sha256_hex(canonical)}"


class Cache(Protocol):
    backend: str

    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes, ttl_s: int) -> None: ...
    async def close(self) -> None: ...
    def status(self) -> dict: ...


ENTRY_OVERHEAD = 256  # bytes an entry costs beyond its value: the key string, the tuple, the cache's bookkeeping


class LocalCache:
    """In-process LRU bounded in bytes (values plus a per-entry overhead), whose entries each expire after their
    own TTL. A value larger than the whole budget is not kept."""

    backend = "memory"

    def __init__(self, max_bytes: int) -> None:
        # TLRU: least-recently-used eviction, and each entry's time-to-use taken from its (data, ttl) value.
        self._data: TLRUCache = TLRUCache(
            maxsize=max_bytes,
            ttu=lambda _k, v, now: now + v[1],
            timer=time.monotonic,
            getsizeof=lambda v: len(v[0]) + ENTRY_OVERHEAD,
        )

    async def get(self, key: str) -> bytes | None:
        value = self._data.get(key)
        return None if value is None else value[0]

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        if len(value) + ENTRY_OVERHEAD <= self._data.maxsize:
            self._data[key] = (value, ttl_s)

    async def close(self) -> None:
        self._data.clear()

    def status(self) -> dict:
        return {
            "backend": self.backend,
            "entries": len(self._data),
            "bytes": self._data.currsize,
            "max_bytes": self._data.maxsize,
        }


class CircuitBreaker:
    """closed → (``failures`` errors in a row) → open for ``cooldown_s`` → half-open: one trial call."""

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures, self.cooldown_s, self.clock = failures, cooldown_s, clock
        self._errors = 0
        self._opened_at: float | None = None

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "open" if self.clock() - self._opened_at < self.cooldown_s else "half-open"

    def allow(self) -> bool:
        state = self.state
        if state == "half-open":
            self._opened_at = self.clock()  # one trial; others keep bypassing until it reports back
            return True
        return state == "closed"

    def success(self) -> None:
        self._errors, self._opened_at = 0, None

    def failure(self) -> None:
        self._errors += 1
        if self._errors >= self.failures:
            self._opened_at = self.clock()


class RedisCache:
    backend = "redis"

    def __init__(self, url: str, timeout_s: float, breaker: CircuitBreaker) -> None:
        import redis.asyncio as aioredis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No retries: a retry would turn an outage into seconds of latency; the breaker handles it.
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._timeout = timeout_s * 2
        self.breaker = breaker
        self.errors = 0
        self.url = url

    async def _call(self, op: str, *args):  # noqa: ANN202
        if not self.breaker.allow():
            return None
        try:
            result = await asyncio.wait_for(getattr(self._client, op)(*args), self._timeout)
        except Exception as exc:  # any Redis, socket or timeout error: fail open
            self.errors += 1
            self.breaker.failure()
            log.warning("redis %s failed (%s: %s); serving without cache", op, type(exc).__name__, exc)
            return None
        self.breaker.success()
        return result

    async def get(self, key: str) -> bytes | None:
        return await self._call("get", key)

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        await self._call("set", key, value, ttl_s)

    async def close(self) -> None:
        await self._client.aclose()

    def status(self) -> dict:
        return {"backend": self.backend, "circuit": self.breaker.state, "errors": self.errors}
