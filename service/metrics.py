"""The service's Prometheus metrics, in a registry of its own (several apps in one process stay apart).

Label values come from what the service holds, never from a request as sent: ``index`` is a served index's name
(from the registry, once the request's index is known to be one; ``-`` for work of no index, /v1/embeddings),
``modality`` a query modality, ``model`` a loaded model (its name and fingerprint prefix), ``lane`` a tower.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
NO_INDEX = "-"  # the index label of work done for no index: /v1/embeddings
# The stages of a query, each timed once per request (queue and encode: once per query of it).
STAGES = (
    "result_cache",  # the result cache lookup
    "embedding_cache",  # the embedding cache lookups of a request's inputs
    "decode",  # decoding an image or audio file
    "queue",  # a query's wait for its encoder batch
    "encode",  # the encoder run of the batch a query was in
    "search",  # the dense FAISS search (and reading the hits' records)
    "late_rerank",  # late interaction: token candidates and their MaxSim rerank
)


def stage_histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram(
        "xmodal_search_stage_seconds",
        f"a query's stages ({', '.join(STAGES)}) by index (- for none: /v1/embeddings) and query modality",
        ["stage", "index", "modality"],
        registry=registry,
        buckets=SECONDS,
    )


class BatchMetrics:
    """The micro-batcher's (service.batcher): batch sizes actually formed, encode time per batch, a query's wait,
    queries dropped or refused; by model and lane, so that two models' lanes stay apart. ``stages`` is where each
    query's queue wait and encode time go, by its index and modality."""

    def __init__(self, registry: CollectorRegistry, stages: Histogram | None = None) -> None:
        lane = ["model", "lane"]
        self.stages = stages if stages is not None else stage_histogram(registry)
        self.queue_seconds = Histogram(
            "xmodal_batch_queue_seconds", "a query's wait for its batch", lane, registry=registry, buckets=SECONDS
        )
        self.batch_size = Histogram(
            "xmodal_batch_size", "queries per encoded batch", lane, registry=registry, buckets=BATCH_SIZES
        )
        self.encode_seconds = Histogram(
            "xmodal_batch_encode_seconds", "encoder time per batch", lane, registry=registry, buckets=SECONDS
        )
        self.dropped = Counter(
            "xmodal_batch_dropped", "queries dropped unencoded", [*lane, "reason"], registry=registry
        )
        self.rejected = Counter("xmodal_batch_rejected", "queries refused: queue full", lane, registry=registry)
        self.failed = Counter(
            "xmodal_batch_failed", "batches that raised (then encoded one by one)", lane, registry=registry
        )


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
        self.stage_seconds = stage_histogram(self.registry)
        self.cache = Counter("xmodal_cache_lookups", "cache lookups", ["kind", "outcome"], registry=self.registry)
        self.index_items = Gauge(
            "xmodal_index_items", "items in the loaded index version", ["index"], registry=self.registry
        )
        self.batch = BatchMetrics(self.registry, self.stage_seconds)  # one for every model's batcher: labelled

    def stage(self, stage: str, index: str, modality: str, seconds: float) -> None:
        self.stage_seconds.labels(stage, index, modality).observe(seconds)
