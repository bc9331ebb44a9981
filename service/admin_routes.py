"""Admin routes (an admin API key, service.auth): queue a rebuild, an add, a delete, a compaction or a model
upgrade of an index (each a job: 202 and its status), read a job's status."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from indexer.layout import IndexDir
from service.auth import require_admin
from service.job_queue import Jobs
from service.job_store import JobStatus
from service.jobs import RebuildRequest, UpgradeRequest, check_request, check_upgrade
from service.payloads import decode_base64
from service.schemas import ErrorResponse
from service.state import ServiceState, get_state
from service.uploads import DeleteRequest, ItemsRequest, save_upload

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 413, 415, 422, 503)}
LOCATION = {"description": "the job's status: GET /v1/jobs/{id}", "required": True, "schema": {"type": "string"}}
QUEUED = {202: {"description": "queued: the job's status", "headers": {"Location": LOCATION}}}
router = APIRouter(dependencies=[Depends(require_admin)], responses=ERRORS, tags=["admin"])


def get_jobs(request: Request) -> Jobs:
    return request.app.state.jobs


@router.post(
    "/v1/indexes/{name}/rebuild",
    status_code=202,
    response_model=JobStatus,
    responses=QUEUED,
    summary="Queue a full rebuild from a corpus below the corpora root, or from the published version's items",
)
async def rebuild(
    name: str, body: RebuildRequest, state: ServiceState = Depends(get_state), jobs: Jobs = Depends(get_jobs)
) -> JSONResponse:
    await run_in_threadpool(check_request, state.settings, name, body)
    return accepted(await jobs.submit(name, body.spec()))


def accepted(status: JobStatus) -> JSONResponse:
    return JSONResponse(status.model_dump(mode="json"), status_code=202, headers={"Location": f"/v1/jobs/{status.id}"})


def published(state: ServiceState, name: str) -> None:
    """Adds, deletes and compactions change a published index: 404 before queueing when there is none."""
    IndexDir(state.settings.indexes_dir, name).current()


@router.post(
    "/v1/indexes/{name}/items",
    status_code=202,
    response_model=JobStatus,
    responses=QUEUED,
    summary="Queue an add of items (JSON, media as base64): a new segment; an id the index holds is replaced",
)
async def add_items(
    name: str, body: ItemsRequest, state: ServiceState = Depends(get_state), jobs: Jobs = Depends(get_jobs)
) -> JSONResponse:
    await run_in_threadpool(published, state, name)
    corpus = await run_in_threadpool(save_upload, state.settings.media_dir, name, body, decode_base64)
    return accepted(await jobs.submit(name, {"corpus": str(corpus), "items": len(body.items)}, "add"))


@router.delete(
    "/v1/indexes/{name}/items",
    status_code=202,
    response_model=JobStatus,
    responses=QUEUED,
    summary="Queue a delete of items by id: they are never returned once its version is published",
)
async def delete_items(
    name: str, body: DeleteRequest, state: ServiceState = Depends(get_state), jobs: Jobs = Depends(get_jobs)
) -> JSONResponse:
    await run_in_threadpool(published, state, name)
    return accepted(await jobs.submit(name, {"ids": body.ids}, "delete"))


@router.post(
    "/v1/indexes/{name}/compact",
    status_code=202,
    response_model=JobStatus,
    responses=QUEUED,
    summary="Queue a compaction: the segments merged into one, deleted rows dropped",
)
async def compact(name: str, state: ServiceState = Depends(get_state), jobs: Jobs = Depends(get_jobs)) -> JSONResponse:
    await run_in_threadpool(published, state, name)
    return accepted(await jobs.submit(name, {}, "compact"))


@router.post(
    "/v1/indexes/{name}/upgrade",
    status_code=202,
    response_model=JobStatus,
    responses=QUEUED,
    summary="Queue a model upgrade: the index's queries served with the new model through an adapter at once, its "
    "segments re-encoded in the background",
)
async def upgrade(
    name: str, body: UpgradeRequest, state: ServiceState = Depends(get_state), jobs: Jobs = Depends(get_jobs)
) -> JSONResponse:
    await run_in_threadpool(check_upgrade, state.settings, name, body)
    return accepted(await jobs.submit(name, body.model_dump(exclude_none=True), "upgrade"))


@router.get("/v1/jobs/{job_id}", response_model=JobStatus, summary="A job's state, progress and outcome")
async def job(job_id: str, jobs: Jobs = Depends(get_jobs)) -> JobStatus:
    return await jobs.get(job_id)


@router.get("/v1/jobs", response_model=list[JobStatus], summary="The most recent jobs, newest first")
async def job_list(limit: int = 50, jobs: Jobs = Depends(get_jobs)) -> list[JobStatus]:
    return await jobs.list(max(1, min(limit, 1000)))
