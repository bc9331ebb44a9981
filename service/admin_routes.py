"""Admin routes (an admin API key, service.auth): queue a rebuild, read a job's status."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.auth import require_admin
from service.job_queue import Jobs
from service.job_store import JobStatus
from service.jobs import RebuildRequest, check_request
from service.schemas import ErrorResponse
from service.state import ServiceState, get_state

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 422, 503)}
router = APIRouter(dependencies=[Depends(require_admin)], responses=ERRORS, tags=["admin"])


def get_jobs(request: Request) -> Jobs:
    return request.app.state.jobs


@router.post(
    "/v1/indexes/{name}/rebuild",
    status_code=202,
    response_model=JobStatus,
    summary="Queue a full rebuild from a corpus below the corpora root, or from the published version's items",
)
async def rebuild(
    name: str, body: RebuildRequest, state: ServiceState = Depends(get_state), jobs: Jobs = Depends(get_jobs)
) -> JSONResponse:
    await run_in_threadpool(check_request, state.settings, name, body)
    status = await jobs.submit(name, body.spec())
    return JSONResponse(status.model_dump(mode="json"), status_code=202, headers={"Location": f"/v1/jobs/{status.id}"})


@router.get("/v1/jobs/{job_id}", response_model=JobStatus, summary="A job's state, progress and outcome")
async def job(job_id: str, jobs: Jobs = Depends(get_jobs)) -> JobStatus:
    return await jobs.get(job_id)


@router.get("/v1/jobs", response_model=list[JobStatus], summary="The most recent jobs, newest first")
async def job_list(limit: int = 50, jobs: Jobs = Depends(get_jobs)) -> list[JobStatus]:
    return await jobs.list(max(1, min(limit, 1000)))
