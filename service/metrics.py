"""The service's Prometheus metrics, in a registry of its own (several apps in one process stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.batcher import SECONDS, BatchMetrics


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
        self.stage_seconds = Histogram(
            "xmodal_search_stage_seconds",
            "a search's stages: result cache lookup, dense FAISS search, late-interaction search and rerank",
            ["stage", "index", "modality"],
            registry=self.registry,
            buckets=SECONDS,
        )
        self.cache = Counter("xmodal_cache_lookups", "cache lookups", ["kind", "outcome"], registry=self.registry)
        self.index_items = Gauge(
            "xmodal_index_items", "items in the loaded index version", ["index"], registry=self.registry
        )
        self.decode_seconds = Histogram(
            "xmodal_decode_seconds", "decoding a query file", ["modality"], registry=self.registry, buckets=SECONDS
        )
        self.batch = BatchMetrics(self.registry)  # one for every model's batcher: lanes are labelled
