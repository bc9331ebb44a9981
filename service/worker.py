"""`xmodal worker`: an arq worker that executes the jobs queued in Redis, one at a time.

arq re-runs a job whose worker died once the job's in-progress key in Redis expires. arq gives that key the
job timeout (hours, for a rebuild) as its lifetime; the worker keeps it as a short lease instead
(XMODAL_JOB_LEASE_S, renewed every third of it while the job runs), so a job whose worker was killed is picked up
by another worker within a lease, not hours later. The build runs in a thread: a `kill -9` takes it down with the
worker, and nothing half-written is ever published (builds write atomically); SIGTERM (or arq's job timeout) stops
it at its next batch and arq queues the job again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading

from service.job_queue import JOB_FUNCTION, QUEUE, to_json
from service.job_store import RedisJobStore
from service.settings import Settings

log = logging.getLogger(__name__)


async def _renew(redis, job_id: str, lease_s: float) -> None:  # noqa: ANN001 - arq.ArqRedis
    from arq.constants import in_progress_key_prefix

    try:
        await redis.pexpire(in_progress_key_prefix + job_id, int(lease_s * 1000))
    except Exception as exc:  # Redis blinked: the next renewal may still make it in time
        log.warning("job %s: could not renew its lease: %s", job_id, exc)


async def _keep_lease(redis, job_id: str, lease_s: float) -> None:  # noqa: ANN001 - arq.ArqRedis
    while True:
        await asyncio.sleep(lease_s / 3)
        await _renew(redis, job_id, lease_s)


async def rebuild(ctx: dict) -> str:
    """The arq job: run it (service.jobs.execute) in a thread while renewing the lease; the final state."""
    from service.jobs import execute

    settings: Settings = ctx["settings"]
    await _renew(ctx["redis"], ctx["job_id"], settings.job_lease_s)  # the short lease, before any work
    lease = asyncio.create_task(_keep_lease(ctx["redis"], ctx["job_id"], settings.job_lease_s))
    stop = threading.Event()
    try:
        status = await asyncio.to_thread(execute, settings, ctx["store"], ctx["job_id"], ctx["job_try"], stop.is_set)
    except asyncio.CancelledError:
        # SIGTERM or the job timeout: arq queues the job again; a thread cannot be cancelled, so tell the build to
        # stop at its next batch rather than finish (and publish) beside the job's next run.
        stop.set()
        raise
    finally:
        lease.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await lease
    return status.state


def make_worker(settings: Settings):  # noqa: ANN201 - arq.Worker
    from arq import func
    from arq.connections import RedisSettings
    from arq.worker import Worker

    if not settings.redis_url:
        raise ValueError("a worker needs Redis: set XMODAL_REDIS_URL")
    store = RedisJobStore(settings.redis_url, settings.job_ttl_s)

    async def shutdown(_ctx: dict) -> None:
        store.close()

    return Worker(
        functions=[func(rebuild, name=JOB_FUNCTION, max_tries=settings.job_max_tries)],
        queue_name=QUEUE,
        redis_settings=RedisSettings.from_dsn(settings.redis_url),
        job_serializer=to_json,
        job_deserializer=json.loads,
        max_jobs=1,  # a build uses every core; run more workers for more at once
        job_timeout=settings.job_timeout_s,
        keep_result=settings.job_ttl_s,
        ctx={"settings": settings, "store": store},
        on_shutdown=shutdown,
        poll_delay=0.5,
    )
