"""Queueing jobs: with Redis, on the arq queue that `xmodal worker` processes execute; without, in one background
process of the service (spawned, one job at a time). Both keep the same status records (service.job_store), so
`GET /v1/jobs/{id}` and `xmodal jobs` read them the same way."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import multiprocessing
import os
import socket
import uuid
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool

from models.files import process_alive
from service.errors import NotReady
from service.job_store import FINISHED, FileJobStore, JobStatus, JobStore, RedisJobStore, now_iso, update
from service.settings import Settings

log = logging.getLogger(__name__)
QUEUE = "xmodal:queue"  # the arq queue name (arq's own keys are arq:job:<id>, arq:in-progress:<id>, ...)
JOB_FUNCTION = "rebuild"


def to_json(obj: object) -> bytes:
    """arq's serializer: JSON, never pickle; an exception in a result (a job that ran out of tries) becomes its text."""
    return json.dumps(obj, default=str).encode()


def new_status(name: str, request: dict, kind: str = "rebuild") -> JobStatus:
    return JobStatus(id=uuid.uuid4().hex, kind=kind, index=name, request=request, created_at=now_iso())


class Jobs:
    """The interface the routes and the CLI use."""

    store: JobStore

    async def submit(self, name: str, request: dict, kind: str = "rebuild") -> JobStatus:
        raise NotImplementedError

    async def get(self, job_id: str) -> JobStatus:
        return await run_in_threadpool(self.store.get, job_id)

    async def list(self, limit: int = 50) -> list[JobStatus]:
        return await run_in_threadpool(self.store.list, limit)

    async def close(self) -> None:
        return None


class RedisJobs(Jobs):
    def __init__(self, settings: Settings) -> None:
        assert settings.redis_url
        self.settings = settings
        self.store = RedisJobStore(settings.redis_url, settings.job_ttl_s)
        self._pool = None
        self._lock = asyncio.Lock()

    async def pool(self):  # noqa: ANN201 - arq.ArqRedis
        """The arq connection, made at first use: a Redis outage at startup must not stop the service."""
        from arq import create_pool
        from arq.connections import RedisSettings

        async with self._lock:
            if self._pool is None:
                redis_settings = RedisSettings.from_dsn(self.settings.redis_url or "")
                redis_settings.conn_retries = 0
                try:
                    self._pool = await create_pool(
                        redis_settings, job_serializer=to_json, job_deserializer=json.loads, default_queue_name=QUEUE
                    )
                except Exception as exc:  # redis-py's ConnectionError and friends
                    raise NotReady(f"the job queue (Redis) is not reachable: {exc}") from None
            return self._pool

    async def submit(self, name: str, request: dict, kind: str = "rebuild") -> JobStatus:
        status = new_status(name, request, kind)
        pool = await self.pool()
        try:
            await run_in_threadpool(self.store.put, status)
            await pool.enqueue_job(JOB_FUNCTION, _job_id=status.id, _queue_name=QUEUE)
        except Exception as exc:  # Redis went away between the two
            with contextlib.suppress(Exception):
                await run_in_threadpool(update, self.store, status.id, state="failed", error="could not be queued")
            raise NotReady(f"could not queue the job on Redis: {exc}") from None
        return status

    async def get(self, job_id: str) -> JobStatus:
        status = await super().get(job_id)
        if status.state in FINISHED:
            return status
        # A job that ran out of tries (its workers kept dying) is finished by arq without running it again:
        # its record still says running, arq's result says why it stopped.
        from arq.jobs import Job

        result = await Job(job_id, await self.pool(), _queue_name=QUEUE, _deserializer=json.loads).result_info()
        if result is not None and not result.success:
            status = await run_in_threadpool(
                update,
                self.store,
                job_id,
                state="failed",
                error=f"the job did not finish: {result.result}",
                finished_at=now_iso(),
            )
        return status

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
        self.store.close()


class LocalJobs(Jobs):
    """One spawned process runs the jobs one at a time; ``on_done`` (the service's index refresh) runs when one
    ends, so the new version is served without waiting for the poll."""

    def __init__(self, settings: Settings, on_done: Callable[[], None]) -> None:
        self.settings = settings
        self.store = FileJobStore(settings.jobs_dir)
        self._on_done = on_done
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._pending: set[str] = set()  # queued or running here
        self._closing = False
        self._fail_orphans()

    def _fail_orphans(self) -> None:
        """Jobs this host's earlier service process queued or ran but never finished (it stopped): failed, saying so."""
        for status in self.store.list(limit=1000):
            runner = status.runner
            if (
                status.state in FINISHED
                or runner.get("host") != socket.gethostname()
                or process_alive(runner.get("pid", 0))
            ):
                continue
            update(
                self.store,
                status.id,
                state="failed",
                finished_at=now_iso(),
                error="the service stopped before this job finished; submit it again",
            )

    async def submit(self, name: str, request: dict, kind: str = "rebuild") -> JobStatus:
        from service.jobs import run_local

        status = new_status(name, request, kind).model_copy(
            update={"runner": {"host": socket.gethostname(), "pid": os.getpid()}}
        )
        await run_in_threadpool(self.store.put, status)
        if self._executor is None:
            # spawn, not fork: the service holds threads, ONNX sessions and sockets a fork would copy half-way.
            self._executor = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        future = self._executor.submit(run_local, self.settings.model_dump_json(), status.id)
        self._pending.add(status.id)
        loop = asyncio.get_running_loop()

        def done(f: concurrent.futures.Future) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the service has stopped
                loop.call_soon_threadsafe(self._finished, status.id, f)

        future.add_done_callback(done)
        return status

    def _finished(self, job_id: str, future: concurrent.futures.Future) -> None:
        self._pending.discard(job_id)
        if self._closing or future.cancelled():  # close() says what became of it
            return
        exc = future.exception()
        if exc is not None:  # the background process died (killed, out of memory): the record must say so
            log.error("job %s: the background process failed: %s", job_id, exc)
            update(
                self.store,
                job_id,
                state="failed",
                finished_at=now_iso(),
                error=f"the background process running the job died ({type(exc).__name__})",
            )
            self._executor = None  # a broken pool takes no more work; the next job gets a fresh one
        asyncio.get_running_loop().run_in_executor(None, self._on_done)

    async def close(self) -> None:
        """Stop the background process (a build may take hours; the service must stop now) and fail the jobs it
        had not finished. A build killed mid-way leaves nothing published; the next build removes its staging."""
        self._closing = True
        if self._executor is None:
            return
        unfinished = list(self._pending)
        processes = list(getattr(self._executor, "_processes", {}).values())  # private, but the only handle
        self._executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        for process in processes:
            await run_in_threadpool(process.join, 10)
        for job_id in unfinished:
            if self.store.get(job_id).state not in FINISHED:
                update(
                    self.store,
                    job_id,
                    state="failed",
                    finished_at=now_iso(),
                    error="the service stopped before this job finished; submit it again",
                )


def make_jobs(settings: Settings, on_done: Callable[[], None]) -> Jobs:
    return RedisJobs(settings) if settings.redis_url else LocalJobs(settings, on_done)
