"""What a job does, wherever it runs (an arq worker, or the service's background process). A rebuild reads the
items (a corpus below the corpora root, or the published version's own items), encodes them with the configured
model and publishes a new version (``indexer.build.build_index``); an add encodes posted items into a new segment
(``indexer.build.add_items``); a delete tombstones ids and a compaction merges segments (``indexer.lifecycle``).
Each publishes atomically, announces the version, and keeps the job's status record up to date. An error ends
the job `failed` with its message; it never escapes as a traceback."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from models.errors import IndexNotFound, XmodalError
from service import index_ops
from service.job_store import FINISHED, JobStatus, JobStore, Progress, now_iso, update
from service.schemas import RequestBody
from service.settings import Settings

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 0.5  # status writes while encoding, at most this often


def one_source_schema(schema: dict) -> None:
    """Exactly one of `corpus` and `from`, as the JSON schema says it (a client never needs to send either as null)."""
    schema["oneOf"] = [{"required": ["corpus"]}, {"required": ["from"]}]
    for name in ("corpus", "from"):
        prop = schema["properties"][name]
        prop.pop("default", None)
        prop.update(next(s for s in prop.pop("anyOf") if s.get("type") != "null"))


class RebuildRequest(RequestBody):
    """Body of POST /v1/indexes/{name}/rebuild: exactly one of `corpus` and `from`."""

    model_config = ConfigDict(populate_by_name=True, json_schema_extra=one_source_schema)
    corpus: str | None = Field(None, description="a JSONL file or folder below the corpora root (relative or absolute)")
    from_: Literal["current"] | None = Field(
        None, alias="from", description='"current": re-encode the published version\'s items'
    )
    late: bool | None = Field(None, description="store token vectors (default: as the published version does)")
    model: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="the model bundle to build with (default: the index's own model; XMODAL_MODEL for a new index)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> RebuildRequest:
        if (self.corpus is None) == (self.from_ is None):
            raise ValueError('give exactly one of "corpus" (a path below the corpora root) and "from": "current"')
        return self

    def spec(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True)


def rebuild(settings: Settings, name: str, request: dict, progress: Callable[[int, int], None]) -> str:
    """Build and publish a new version of ``name``; its version name."""
    from indexer.build import LateBuild, build_index, late_of
    from indexer.corpus import read_corpus
    from indexer.layout import IndexDir
    from indexer.reencode import items_of_version
    from service.corpora import check_media_under, resolve_corpus

    index = IndexDir(settings.indexes_dir, name)
    current = index.manifest() if index.exists() else None
    if "corpus" in request:
        corpus = resolve_corpus(settings.corpora_root, request["corpus"])  # again: it may have changed since
        items = read_corpus(corpus)
        check_media_under(settings.corpora_root, items)
    else:
        corpus = None
        items = items_of_version(settings.indexes_dir, name)
    shape = late_of(current) if current is not None else None
    late = (shape or LateBuild()) if request.get("late", shape is not None) else None
    encoder = index_ops.index_encoder(settings, name, request.get("model"))
    result = build_index(
        indexes_dir=settings.indexes_dir,
        name=name,
        items=items,
        encoder=encoder,
        corpus_path=corpus,
        use_gpu=settings.device != "cpu",
        progress=progress,
        late=late,
        keep_versions=settings.keep_versions,
        memory_budget=settings.index_memory_bytes,
    )
    return _published(settings, name, result.manifest.version)


def add(settings: Settings, name: str, request: dict, progress: Callable[[int, int], None]) -> str:
    """Encode the posted items (saved by service.uploads) into a new segment."""
    return _published(settings, name, index_ops.add_corpus(settings, name, Path(request["corpus"]), progress).version)


def delete(settings: Settings, name: str, request: dict, progress: Callable[[int, int], None]) -> str:
    return _published(settings, name, index_ops.delete_ids(settings, name, request["ids"])[0].version)


def compact(settings: Settings, name: str, request: dict, progress: Callable[[int, int], None]) -> str:
    return _published(settings, name, index_ops.compact_index(settings, name).version)


class UpgradeRequest(RequestBody):
    """Body of POST /v1/indexes/{name}/upgrade."""

    model: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="NEW: the model bundle to move the index to; its queries are served with it at once",
    )
    adapter: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="the adapter bundle (NEW -> the index's model) to search the index through until the backfill "
        "is done; default: the newest one between the two models (the service fits none: `xmodal index upgrade` "
        "fits one on the index's own texts, `xmodal models align` on any)",
    )


def upgrade(settings: Settings, name: str, request: dict, progress: Callable[[int, int], None]) -> str:
    """Serve the index's queries with NEW through an adapter at once, then backfill its segments with NEW, each
    version announced as it is published; resumes where a crashed run left off."""
    from service.events import announce_published

    def announce(version) -> None:  # noqa: ANN001 - a VersionManifest
        announce_published(settings.redis_url, name, version.version)

    final = index_ops.upgrade_index(
        settings, name, request["model"], request.get("adapter"), progress=progress, on_version=announce
    )
    return final.version


def check_upgrade(settings: Settings, name: str, request: UpgradeRequest) -> None:
    """404 before queueing: no published index, no such model, no adapter bundle between the two models (the service
    fits none: that needs the `export` extra; the CLI's `xmodal index upgrade` does)."""
    from indexer.layout import IndexDir
    from models.bundle import load_manifest

    current = IndexDir(settings.indexes_dir, name).manifest()
    new = load_manifest(settings.all_models_dir / request.model)
    resuming = current.upgrade is not None and current.model.fingerprint == new.fingerprint
    if request.adapter is not None or not resuming:
        index_ops.adapter_for(settings, current, new.fingerprint, request.model, request.adapter)


def _published(settings: Settings, name: str, version: str) -> str:
    from service.events import announce_published

    announce_published(settings.redis_url, name, version)
    return version


RUNS = {"rebuild": rebuild, "add": add, "delete": delete, "compact": compact, "upgrade": upgrade}


class Interrupted(Exception):
    """The worker was told to stop (SIGTERM, or arq's job timeout): the build stops at its next batch."""


def execute(
    settings: Settings, store: JobStore, job_id: str, attempt: int, should_stop: Callable[[], bool] = lambda: False
) -> JobStatus:
    """Run job ``job_id`` (its record says what to do) and leave its outcome in the record. ``should_stop`` is
    asked at every progress step; when it says so, the build stops and the job is `queued` again (its queue
    runs it again)."""
    job = store.get(job_id)
    if job.state in FINISHED:  # a retry of a job that had finished before its worker died
        return job
    update(store, job_id, state="running", attempt=attempt, started_at=now_iso(), progress=Progress())
    last = 0.0

    def progress(done: int, total: int) -> None:
        nonlocal last
        if should_stop():
            raise Interrupted
        if time.monotonic() - last >= PROGRESS_EVERY_S or done == total:
            last = time.monotonic()
            update(store, job_id, progress=Progress(done=done, total=total))

    try:
        version = RUNS[job.kind](settings, job.index, job.request, progress)
    except Interrupted:
        log.warning("job %s (%s of %s) interrupted; it will run again", job_id, job.kind, job.index)
        return update(store, job_id, state="queued", progress=None)
    except XmodalError as exc:
        log.warning("job %s (%s of %s) failed: %s", job_id, job.kind, job.index, exc.message)
        return update(store, job_id, state="failed", error=exc.message, finished_at=now_iso())
    except Exception as exc:  # a bug: the log has the traceback, the status a sentence
        log.exception("job %s (%s of %s) failed", job_id, job.kind, job.index)
        error = f"internal error ({type(exc).__name__}): {exc}"
        return update(store, job_id, state="failed", error=error, finished_at=now_iso())
    log.info("job %s: %s %s version %s published", job_id, job.kind, job.index, version)
    return update(store, job_id, state="succeeded", version=version, finished_at=now_iso())


def run_local(settings_json: str, job_id: str) -> str:
    """Entry point of the service's background process (no Redis): the settings arrive as JSON, the status lives
    in ``<data>/jobs``. Returns the final state."""
    from service.job_store import FileJobStore

    settings = Settings.model_validate_json(settings_json)  # no Redis here: its alias-only field stays unset
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return execute(settings, FileJobStore(settings.jobs_dir), job_id, attempt=1).state


def check_request(settings: Settings, name: str, request: RebuildRequest) -> None:
    """Refuse what can be refused before queueing: a corpus outside the root, no published version to re-encode."""
    from indexer.layout import IndexDir, check_name
    from models.bundle import load_manifest
    from service.corpora import resolve_corpus

    check_name(name)
    if request.corpus is not None:
        resolve_corpus(settings.corpora_root, request.corpus)
    elif not IndexDir(settings.indexes_dir, name).exists():
        raise IndexNotFound(
            f'index {name!r} has no published version to re-encode ("from": "current"); give a "corpus"'
        )
    if request.model is not None:
        load_manifest(settings.all_models_dir / request.model)  # ModelNotFound (404) before queueing
