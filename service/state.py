"""What the app holds for its lifetime: the encoder, the loaded index versions, the cache, the metrics.

Built in the lifespan, reached by routes through ``get_state``. Index versions are swapped by replacing
a dict entry, so a request that already holds a LoadedIndex finishes on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Sequence

import numpy as np
from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.concurrency import run_in_threadpool

from indexer.layout import IndexDir, list_indexes
from indexer.search import LoadedIndex
from models.encoder import Encoder, TokenOutput
from models.errors import IndexNotFound, InvalidInput, XmodalError
from service.admission import Admission
from service.batcher import SECONDS, BatchMetrics, MicroBatcher
from service.budget import MB, MemoryBudget
from service.cache import Cache, CircuitBreaker, LocalCache, RedisCache, embedding_key
from service.errors import NotReady
from service.media import MediaRenderer
from service.settings import Settings

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("xmodal_http_requests", "HTTP requests", ["path", "status"], registry=self.registry)
        self.search_seconds = Histogram(
            "xmodal_search_seconds",
            "server-side /v1/search time",
            ["cached"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.cache = Counter("xmodal_cache_lookups", "cache lookups", ["kind", "outcome"], registry=self.registry)
        self.index_items = Gauge(
            "xmodal_index_items", "items in the loaded index version", ["index"], registry=self.registry
        )
        self.decode_seconds = Histogram(
            "xmodal_decode_seconds", "decoding a query file", ["modality"], registry=self.registry, buckets=SECONDS
        )
        self.batch = BatchMetrics(self.registry)


def make_cache(settings: Settings) -> Cache:
    if settings.redis_url:
        return RedisCache(
            settings.redis_url,
            settings.redis_timeout_s,
            CircuitBreaker(settings.breaker_failures, settings.breaker_cooldown_s),
        )
    return LocalCache(settings.lru_bytes)


class ServiceState:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.encoder: Encoder | None = None
        self.indexes: dict[str, LoadedIndex] = {}
        self.index_errors: dict[str, str] = {}
        self.model_error: str | None = None
        self.cache: Cache = make_cache(settings)
        self.metrics = Metrics()
        self.media = MediaRenderer(settings.media_cache_bytes)
        self.batcher: MicroBatcher | None = None
        self.decode_budget = MemoryBudget(settings.decode_memory_mb * MB, settings.decode_wait_s, self.metrics.registry)
        self.admission = Admission.from_settings(settings, self.metrics.registry)

    # --- loading -------------------------------------------------------------------------------
    def load_model(self) -> None:
        try:
            self.encoder = Encoder(self.settings.model_dir, device=self.settings.device, threads=self.settings.threads)
            self.encoder.encode_text(["warm up"])  # first run allocates; keep it off the first request
            self.batcher = MicroBatcher(
                self.encoder, self.settings, self.metrics.batch, lambda: self.admission.inflight
            )
            self.model_error = None
        except XmodalError as exc:
            self.model_error = exc.message
            log.error("model not loaded: %s", exc.message)

    def refresh_indexes(self) -> None:
        """Load indexes whose published version changed. A version that cannot be served (a damaged file, another
        model, an unreadable manifest) is refused and listed with the reason, once in the log; the version already
        loaded keeps serving; other indexes are not held up by it."""
        if self.encoder is None:
            return
        for name in list_indexes(self.settings.indexes_dir):
            try:
                self._refresh_one(name)
            except Exception as exc:  # noqa: BLE001 - whatever one index does, the others keep swapping
                message = exc.message if isinstance(exc, XmodalError) else f"{type(exc).__name__}: {exc}"
                if self.index_errors.get(name) != message:
                    if isinstance(exc, XmodalError):
                        log.error("index %s not loaded: %s", name, message)
                    else:
                        log.exception("index %s not loaded", name)
                self.index_errors[name] = message

    def _refresh_one(self, name: str) -> None:
        version = IndexDir(self.settings.indexes_dir, name).current()
        old = self.indexes.get(name)
        if old is not None and old.version == version:
            self.index_errors.pop(name, None)  # e.g. rolled back to the version being served
            return
        loaded = LoadedIndex(
            self.settings.indexes_dir,
            name,
            version,
            use_gpu=self.settings.device != "cpu",
            expect_fingerprint=self.encoder.fingerprint,
            verify=self.settings.verify_checksums,
            previous=old,  # its segments are immutable: the new version shares them, loaded and checked once
        )
        self.indexes[name] = loaded
        self.index_errors.pop(name, None)
        self.metrics.index_items.labels(name).set(loaded.size)
        log.info(
            "serving index %s version %s (%d items)%s",
            name,
            loaded.version,
            loaded.size,
            f", replacing {old.version}" if old else "",
        )

    async def watch_indexes(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval_s)
            try:
                await run_in_threadpool(self.refresh_indexes)
            except Exception:  # never let the watcher die
                log.exception("index refresh failed")

    async def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        await self.cache.close()
        for index in self.indexes.values():
            index.close()

    # --- serving -------------------------------------------------------------------------------
    def ready(self) -> bool:
        """The model is loaded and every published index has a version being served (a refused new version
        while an older one serves is degraded, not unready)."""
        return self.encoder is not None and all(name in self.indexes for name in self.index_errors)

    def require_encoder(self) -> Encoder:
        if self.encoder is None:
            raise NotReady(f"the model is not loaded: {self.model_error or 'still starting'}")
        return self.encoder

    def index(self, name: str) -> LoadedIndex:
        self.require_encoder()
        loaded = self.indexes.get(name)
        if loaded is None:
            if name in self.index_errors:
                raise NotReady(f"index {name!r} cannot be served: {self.index_errors[name]}")
            raise IndexNotFound(f"no index named {name!r}; available: {sorted(self.indexes)}")
        return loaded

    def _check_text(self, text: str) -> None:
        if len(text) > self.settings.max_text_chars:
            raise InvalidInput(f"query.text is {len(text)} characters; the limit is {self.settings.max_text_chars}")

    async def text_vector(self, text: str) -> np.ndarray:
        self._check_text(text)
        return (await self.encode("text", [text]))[0]

    async def media_vector(self, modality: str, data: bytes) -> np.ndarray:
        """The query vector of an image or audio file's bytes."""
        return (await self.encode(modality, [data]))[0]

    async def text_tokens(self, text: str) -> TokenOutput:
        """One text's pooled vector and token vectors, for late interaction."""
        self._check_text(text)
        return (await self.encode("text", [text], tokens=True))[0]

    async def media_tokens(self, modality: str, data: bytes) -> TokenOutput:
        return (await self.encode(modality, [data], tokens=True))[0]

    async def encode(self, modality: str, inputs: Sequence[str | bytes], tokens: bool = False) -> list:
        """Texts, or image / audio files' bytes → each one's vector ([dim] float32) or, with ``tokens``, its
        TokenOutput (one row). Through the embedding cache; the misses are decoded (within the decoding memory
        budget, off the event loop) and join micro-batches with other requests' queries."""
        encoder = self.require_encoder()
        deadline = time.monotonic() + self.settings.request_timeout_s
        kind = f"{modality}+tokens" if tokens else modality
        keys = [embedding_key(encoder.fingerprint, kind, x.encode() if isinstance(x, str) else x) for x in inputs]
        found: list = []
        for key in keys:  # one at a time: a 256-text request must not open 256 Redis connections
            found.append(self._from_cache(await self.cache.get(key), tokens))
        misses = [i for i, v in enumerate(found) if v is None]
        self.metrics.cache.labels("embedding", "hit").inc(len(inputs) - len(misses))
        if not misses:
            return found
        self.metrics.cache.labels("embedding", "miss").inc(len(misses))
        batcher = self.require_batcher()
        if modality == "text":
            fresh = await batcher.encode("text", tokens, [inputs[i] for i in misses], deadline)
        else:
            fresh = await all_of([self._decoded_encode(modality, inputs[i], tokens, deadline) for i in misses])
        for i, value in zip(misses, fresh, strict=True):
            if tokens and len(value.tokens[0]) == 0:
                raise InvalidInput(f"the {modality} query has no tokens to match")
            found[i] = value
            await self.cache.set(keys[i], self._to_cache(value, tokens), self.settings.embedding_ttl_s)
        return found

    async def _decoded_encode(
        self, modality: str, data: bytes, tokens: bool, deadline: float
    ) -> np.ndarray | TokenOutput:
        """Decode one file within the memory budget (reserved from its header), then encode it in a batch; its
        decoded form's memory is held until it is encoded."""
        encoder, batcher = self.require_encoder(), self.require_batcher()
        cost = await run_in_threadpool(encoder.decode_cost, modality, data)
        loop = asyncio.get_running_loop()
        async with self.decode_budget.reserve(max(cost.peak, cost.kept), f"this {modality}") as reservation:
            t0 = time.perf_counter()
            decoded = await reservation.hold_while(loop.run_in_executor(None, encoder.decode, modality, data))
            self.metrics.decode_seconds.labels(modality).observe(time.perf_counter() - t0)
            reservation.shrink(cost.kept)
            reservation.hand_over()  # the batcher gives it back once no queue or batch holds the decoded file
            found = await batcher.encode(modality, tokens, [decoded], deadline, reservation.release)
            return found[0]

    def _from_cache(self, raw: bytes | None, tokens: bool) -> np.ndarray | TokenOutput | None:
        """A cached vector, or for tokens float32 [1 + n, D]: the pooled vector, then the tokens."""
        row = self.require_encoder().dim * 4
        if raw is None:
            return None
        if not tokens:
            return np.frombuffer(raw, dtype=np.float32) if len(raw) == row else None
        if len(raw) <= row or len(raw) % row:
            return None
        both = np.frombuffer(raw, dtype=np.float32).reshape(-1, row // 4)
        return TokenOutput(both[:1], [both[1:]])

    @staticmethod
    def _to_cache(value: np.ndarray | TokenOutput, tokens: bool) -> bytes:
        if not tokens:
            return value.astype(np.float32).tobytes()
        return np.concatenate([value.embedding[:1], value.tokens[0]]).astype(np.float32).tobytes()

    def require_batcher(self) -> MicroBatcher:
        self.require_encoder()
        if self.batcher is None:
            raise NotReady("the encoder is still starting")
        return self.batcher

    def given_vector(self, values: list[float]) -> np.ndarray:
        encoder = self.require_encoder()
        vec = np.asarray(values, dtype=np.float32)
        if vec.shape != (encoder.dim,):
            raise InvalidInput(f"query.embedding has {vec.size} values; model {encoder.name} has {encoder.dim}")
        norm = float(np.linalg.norm(vec))
        if not np.isfinite(norm) or norm == 0.0:
            raise InvalidInput("query.embedding must be finite and non-zero")
        return vec / norm  # cosine similarity: unit query


def get_state(request: Request) -> ServiceState:
    return request.app.state.xmodal


def now_ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


async def all_of(coros: list[Coroutine]) -> list:
    """Run concurrently and give the results in order; the first error cancels the others and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
