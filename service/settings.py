"""Settings from the environment (``XMODAL_`` prefix), built in entrypoints and passed in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.bundle import DEFAULT_MODEL


def comma_list(value: str) -> list[str]:
    """A comma-separated setting as its non-empty, stripped parts."""
    return [part.strip() for part in value.split(",") if part.strip()]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="XMODAL_", extra="ignore")

    data_dir: Path = Field(Path("data"), description="holds models/ and indexes/")
    models_dir: Path | None = Field(None, description="model bundles; default <data_dir>/models")
    model: str = Field(DEFAULT_MODEL, description="the default model: /v1/embeddings without `model` uses it")
    models: str = Field(
        "",
        description="model bundles to load, comma-separated, the first being the default; these only (an index "
        "built with another is refused). Unset: XMODAL_MODEL, plus every model a published index was built with",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0 = one per core")
    ort_spinning: bool = Field(
        False,
        description="the service's ONNX Runtime threads spin between parallel sections, as index builds' always do; "
        "off (the default): they sleep, leaving the cores to the event loop and searches (bench/service.py: 8-9 ms "
        "of CPU a search at the peak instead of 10-12, and 10-11 instead of 15-20 under 8x overload)",
    )

    host: str = "127.0.0.1"
    port: int = 8000

    # Either XMODAL_REDIS_URL or the conventional REDIS_URL; unset means an in-process LRU cache.
    redis_url: str | None = Field(None, validation_alias=AliasChoices("XMODAL_REDIS_URL", "REDIS_URL"))
    redis_timeout_s: float = Field(0.1, gt=0, description="socket timeout: a slow Redis never slows a query much")
    breaker_failures: int = Field(3, ge=1, description="consecutive Redis errors that open the circuit")
    breaker_cooldown_s: float = Field(5.0, ge=0, description="how long to bypass Redis once the circuit is open")
    embedding_ttl_s: int = Field(7 * 24 * 3600, ge=1)
    result_ttl_s: int = Field(3600, ge=1)
    lru_bytes: int = Field(
        128 << 20, ge=4096, description="bytes the in-process cache holds when Redis is not used (values and keys)"
    )

    max_k: int = Field(1000, ge=1, le=10_000, description="the most results one search returns (422 above)")
    max_body_bytes: int = Field(10 << 20, ge=1024, description="larger request bodies get 413 (base64 images count)")
    max_text_chars: int = Field(4096, ge=1)
    max_response_floats: int = Field(
        2_000_000,
        ge=1024,
        description="floats one answer may hold: /v1/embeddings (token vectors count) and late search explanations "
        "(8 a match, 1 a heat-map value); more is 413",
    )
    max_inflight: int = Field(
        64, ge=1, description="the hard ceiling: searches and embeddings in flight at once, 429 beyond, whatever load"
    )
    queue_target_ms: float = Field(
        100.0,
        ge=0,
        description="the wait an admitted request may expect: once a standing queue is seen, requests beyond "
        "measured throughput x this are refused at once (429); 0 = a fixed limit of XMODAL_MAX_INFLIGHT",
    )
    min_inflight: int = Field(
        8,
        ge=1,
        description="the adaptive limit never goes below this: so many requests in flight are never refused for "
        "their wait (heavy requests, a slow or stuck encoder still get work)",
    )
    request_timeout_s: float = Field(
        10.0, gt=0, description="how long a query may wait for decoding memory and the encoder, then 503"
    )

    # Micro-batching of query encodes: one queue per tower (and per token-emitting or not), one batch at a time each.
    batch_max: int = Field(32, ge=1, description="the most queries encoded in one batch; 1 = no micro-batching")
    batch_wait_ms: float = Field(3.0, ge=0, description="how long a batch waits for more queries after its first")
    batch_queue: int = Field(512, ge=1, description="queries waiting per tower before 429 (a request's inputs count)")
    batch_max_tokens: int = Field(8192, ge=1, description="a text batch's padded tokens: items x its longest")
    batch_max_pixels: int = Field(64_000_000, ge=1, description="decoded image pixels in one batch")
    decode_memory_mb: int = Field(
        512, ge=1, description="memory lent to decoding images and audio, all requests together (413 over it)"
    )
    decode_wait_s: float = Field(
        2.0, ge=0, description="how long an input waits for decoding memory, or a body for body memory, before 429"
    )
    body_memory_mb: int = Field(
        256,
        ge=1,
        description="memory lent to request bodies of over 64 KiB, all requests together: each reserves 3x its "
        "length (its bytes, its JSON text, its decoded files) before it is read (413 over it, 429 after waiting)",
    )
    serve_media: bool = Field(
        True, description="serve the indexed items' own pictures and sounds (by item id) for the search page at /"
    )
    media_cache_bytes: int = Field(64 << 20, ge=0, description="rendered thumbnails and waveforms kept in memory")
    index_memory_gb: float | None = Field(
        None,
        gt=0,
        description="memory budget of one segment's FAISS index, in GiB, wherever a segment is written (build, add, "
        "compaction): the automatic index choice takes the first index type whose estimate fits, or refuses (unset: "
        "no limit)",
    )
    keep_versions: int = Field(
        5,
        ge=1,
        description="index versions kept per index; builds, adds, deletes and compactions remove older ones "
        "and the segments only they list",
    )
    max_segments: int = Field(
        16,
        ge=1,
        description="an add leaving a version with more segments than this merges its small ones (tiered compaction)",
    )
    verify_checksums: bool = Field(
        True, description="check every file of an index version against its manifest's sha256 before serving it"
    )
    reload_interval_s: float = Field(2.0, ge=0, description="how often to look for newly published versions; 0 = never")

    log_format: Literal["text", "json"] = Field(
        "text", description="log lines as text or one JSON object each; both carry the request's id"
    )
    drain_s: float = Field(
        20.0, ge=0, description="on SIGTERM, how long requests in flight may still run (new ones get 503) before exit"
    )

    # Admin routes (rebuild jobs). Comma-separated keys; none configured disables those routes.
    admin_keys: str = Field("", repr=False, description="API keys for the admin routes, comma-separated")
    # Search-side routes (search, embeddings, clip-retrieval, media, index listings): open when none is set.
    api_keys: str = Field(
        "", repr=False, description="API keys for the search-side routes, comma-separated; unset = open"
    )
    cors_origins: str = Field(
        "",
        description="origins (scheme://host[:port], comma-separated, or *) whose pages may call this API from a "
        "browser; unset = no CORS headers (browsers allow only same-origin calls)",
    )
    # Media by URL (query.image_url, clip-retrieval's image_url): off, as it lets a request make this service
    # connect somewhere (service/fetch.py says what is checked when it is on).
    fetch_urls: bool = Field(False, description="fetch `image_url` queries (http/https, public addresses only)")
    fetch_hosts: str = Field("", description="hosts image_url may name (comma-separated, *.example.org); empty = any")
    fetch_allow_private: bool = Field(
        False, description="UNSAFE, for tests only: also fetch from private and loopback addresses"
    )
    fetch_timeout_s: float = Field(5.0, gt=0, description="connect and per-read timeout of a URL fetch")
    fetch_deadline_s: float = Field(15.0, gt=0, description="the most one URL fetch takes, redirects included")
    corpora_dir: Path | None = Field(
        None, description="rebuild jobs read corpora only below this; default <data>/corpora"
    )
    job_timeout_s: int = Field(
        24 * 3600, ge=1, description="a job running longer is stopped and run again: keep it above the longest build"
    )
    job_max_tries: int = Field(3, ge=1, description="runs of a job, counting retries after its worker died")
    job_lease_s: float = Field(
        30.0,
        gt=0,
        description="a worker's claim on a running job lasts this long and is renewed every third of "
        "it; once a dead worker's claim lapses, another worker runs the job again",
    )
    job_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="how long a finished job's status is kept in Redis")

    def as_environment(self) -> dict[str, str]:
        """These settings as XMODAL_* variables, for processes that build their own (uvicorn's workers)."""
        env = {}
        for name, value in self.model_dump().items():
            if value is not None:
                env[f"XMODAL_{name.upper()}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        return env

    @property
    def index_memory_bytes(self) -> int | None:
        """XMODAL_INDEX_MEMORY_GB in bytes (None: no limit)."""
        return None if self.index_memory_gb is None else int(self.index_memory_gb * (1 << 30))

    @property
    def indexes_dir(self) -> Path:
        return self.data_dir / "indexes"

    @property
    def corpora_root(self) -> Path:
        return self.corpora_dir or self.data_dir / "corpora"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def media_dir(self) -> Path:
        """Media of items added over HTTP (service.uploads): kept, the index's rows point at them."""
        return self.data_dir / "media"

    @property
    def model_list(self) -> list[str]:
        return comma_list(self.models)

    @property
    def admin_key_list(self) -> list[str]:
        return comma_list(self.admin_keys)

    @property
    def api_key_list(self) -> list[str]:
        return comma_list(self.api_keys)

    @property
    def cors_origin_list(self) -> list[str]:
        return comma_list(self.cors_origins)

    @property
    def model_dir(self) -> Path:
        return (self.models_dir or self.data_dir / "models") / self.model

    @property
    def all_models_dir(self) -> Path:
        return self.models_dir or self.data_dir / "models"
