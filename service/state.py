"""What the app holds for its lifetime, built in the lifespan and reached by routes through ``get_state``:

- ``registry`` (service.registry): the loaded models and indexes;
- ``search`` (service.search_service): query dispatch, the result cache, search metrics;
- each model's query encoder (service.query_encoder), reached through the registry;
- the cache, the metrics, admission control, the decoding memory budget and the media renderer they share.
"""

from __future__ import annotations

import functools
import time

from fastapi import Request

from indexer import faiss_backend
from models.encoder import Encoder
from models.runtime import import_onnxruntime
from service.admission import Admission
from service.budget import BODIES, MB, MemoryBudget
from service.cache import Cache, CircuitBreaker, LocalCache, RedisCache
from service.media import MediaRenderer
from service.metrics import Metrics
from service.query_encoder import QueryEncoder
from service.registry import Registry
from service.search_service import SearchService
from service.settings import Settings


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
        self.cache: Cache = make_cache(settings)
        self.metrics = Metrics()
        self.media = MediaRenderer(settings.media_cache_bytes)
        self.admission = Admission.from_settings(settings, self.metrics.registry)
        self.decode_budget = MemoryBudget(settings.decode_memory_mb * MB, settings.decode_wait_s, self.metrics.registry)
        self.body_budget = MemoryBudget(
            settings.body_memory_mb * MB, settings.decode_wait_s, self.metrics.registry, use=BODIES
        )
        self.registry = Registry(settings, self._query_encoder, on_index=self._index_loaded)
        self.search = SearchService(self.registry, self.cache, self.metrics, settings)

    def _query_encoder(self, encoder: Encoder) -> QueryEncoder:
        # the requests in flight are read when a batch forms (whether more are coming), not now
        return QueryEncoder(
            encoder, self.settings, self.cache, self.decode_budget, self.metrics, lambda: self.admission.inflight
        )

    @functools.cached_property
    def devices(self) -> dict:
        """What this process could run on: the device setting (XMODAL_DEVICE), the GPUs FAISS sees, the providers this
        ONNX Runtime offers (read once: they do not change while the process runs; /readyz asks on every probe). What
        each model and index does run on is reported beside them."""
        return {
            "setting": self.settings.device,
            "faiss_gpus": faiss_backend.gpu_count(faiss_backend.import_faiss()),
            "onnxruntime_providers": import_onnxruntime().get_available_providers(),
        }

    def _index_loaded(self, index) -> None:  # noqa: ANN001 - a LoadedIndex
        self.metrics.index_items.labels(index.name).set(index.size)

    async def close(self) -> None:
        self.registry.close()
        await self.cache.close()


def get_state(request: Request) -> ServiceState:
    return request.app.state.xmodal


def deadline_of(request: Request | None, settings: Settings) -> float:
    """The request's deadline (time.monotonic()): XMODAL_REQUEST_TIMEOUT_S from its arrival (service.middleware
    .RequestId stamps it), so time spent waiting for a body, a fetch or admission counts."""
    arrived = getattr(request.state, "arrived", None) if request is not None else None
    return (arrived if arrived is not None else time.monotonic()) + settings.request_timeout_s
