"""Where a job's status lives, one JSON record per job: in Redis beside the arq queue (``xmodal:job:<id>``, listed
by the sorted set ``xmodal:jobs``), or, without Redis, in ``<data>/jobs/<id>.json`` (written atomically). The API
writes the record when it queues a job; the process running the job updates it (state, progress, outcome)."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, Field

from models.errors import NotFound
from models.files import atomic_write_json, read_json

State = Literal["queued", "running", "succeeded", "failed"]
FINISHED = ("succeeded", "failed")
KEY_PREFIX = "xmodal:job:"
LISTING = "xmodal:jobs"
MAX_ID_CHARS = 64  # ids are uuid4 hex (32)


class JobNotFound(NotFound):
    code = "job_not_found"


class Progress(BaseModel):
    done: int = 0
    total: int | None = None


class JobStatus(BaseModel):
    id: str
    kind: Literal["rebuild", "add", "delete", "compact", "upgrade"] = "rebuild"
    index: str
    request: dict = Field(
        description="what was asked: rebuild: corpus or from, late; add: the items' corpus; delete: ids; "
        "upgrade: model, adapter"
    )
    state: State = "queued"
    attempt: int = Field(0, description="runs so far; above 1 when a worker died and the job was retried")
    progress: Progress | None = None
    version: str | None = Field(None, description="the published version, once succeeded")
    error: str | None = Field(None, description="why it failed")
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    runner: dict = Field(default_factory=dict, description="host and pid of the process that queued a local job")


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


class JobStore(Protocol):
    def put(self, status: JobStatus) -> None: ...
    def get(self, job_id: str) -> JobStatus: ...
    def list(self, limit: int = 50) -> list[JobStatus]: ...


def update(store: JobStore, job_id: str, **changes: object) -> JobStatus:
    """One writer per running job (the process running it), so a read-modify-write is enough."""
    status = store.get(job_id).model_copy(update=changes)
    store.put(status)
    return status


class RedisJobStore:
    def __init__(self, redis_url: str, ttl_s: int) -> None:
        import redis

        self._client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        self._ttl_s = ttl_s

    def put(self, status: JobStatus) -> None:
        with self._client.pipeline() as pipe:
            pipe.set(KEY_PREFIX + status.id, status.model_dump_json(), ex=self._ttl_s)
            pipe.zadd(LISTING, {status.id: _created(status)})
            pipe.zremrangebyscore(LISTING, "-inf", time.time() - self._ttl_s)  # statuses expired since
            pipe.execute()

    def get(self, job_id: str) -> JobStatus:
        raw = self._client.get(KEY_PREFIX + job_id)
        if raw is None:
            raise JobNotFound(f"no job {job_id!r} (finished jobs are kept {self._ttl_s} s)")
        return JobStatus.model_validate_json(raw)

    def list(self, limit: int = 50) -> list[JobStatus]:
        ids = [i.decode() for i in self._client.zrevrange(LISTING, 0, limit - 1)]
        raws = self._client.mget([KEY_PREFIX + i for i in ids]) if ids else []
        return [JobStatus.model_validate_json(r) for r in raws if r is not None]

    def close(self) -> None:
        self._client.close()


class FileJobStore:
    def __init__(self, jobs_dir: Path) -> None:
        self._dir = jobs_dir

    def _path(self, job_id: str) -> Path:
        # Ids are 32 hex digits: anything else could name a path, or be longer than a file name may be.
        if not (job_id.isascii() and job_id.isalnum()) or len(job_id) > MAX_ID_CHARS:
            raise JobNotFound(f"no job {job_id[:MAX_ID_CHARS]!r}")
        return self._dir / f"{job_id}.json"

    def put(self, status: JobStatus) -> None:
        atomic_write_json(self._path(status.id), status.model_dump(mode="json"))

    def get(self, job_id: str) -> JobStatus:
        try:
            return JobStatus.model_validate(read_json(self._path(job_id)))
        except FileNotFoundError:
            raise JobNotFound(f"no job {job_id!r}") from None

    def list(self, limit: int = 50) -> list[JobStatus]:
        found = []
        for path in self._dir.glob("*.json") if self._dir.is_dir() else []:
            try:
                found.append(JobStatus.model_validate(json.loads(path.read_text())))
            except (OSError, ValueError):  # being replaced, or not ours
                continue
        return sorted(found, key=lambda s: s.created_at, reverse=True)[:limit]


def _created(status: JobStatus) -> float:
    return dt.datetime.fromisoformat(status.created_at).timestamp()
