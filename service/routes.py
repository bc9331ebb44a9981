"""HTTP routes. Thin: validate, call the state / indexer, shape the response."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from indexer import gpu
from indexer.layout import IndexDir
from models.errors import InvalidInput
from models.runtime import device_of
from service.errors import ClientGone
from service.fetch import with_fetched_image
from service.payloads import upload_modality
from service.render import json_response
from service.schemas import (
    MAX_K,
    ErrorResponse,
    Health,
    IndexInfo,
    IndexList,
    IndexSummary,
    Readiness,
    SearchRequest,
    SearchResponse,
)
from service.search_service import large_answer
from service.settings import Settings
from service.state import ServiceState, deadline_of, get_state

ERRORS = {status: {"model": ErrorResponse} for status in (400, 404, 413, 415, 422, 429, 503)}
router = APIRouter()
T = TypeVar("T")


@router.post(
    "/v1/search", response_model=SearchResponse, responses=ERRORS, summary="Search an index with a text or vector query"
)
async def search(req: SearchRequest, request: Request, state: ServiceState = Depends(get_state)) -> Response:
    answer = await searched(req, state, request, Lifetime.of(request, state.settings))
    return await json_response(answer, large=large_answer(req))


@dataclass(frozen=True)
class Lifetime:
    """When a request arrived and its deadline, taken once: a route that searches twice (/knn-service) or hands over
    to another (/v1/search/file) does not start the clock again."""

    t0: float  # time.perf_counter() when the route began: took_ms
    deadline: float  # time.monotonic(): XMODAL_REQUEST_TIMEOUT_S from the request's arrival

    @classmethod
    def of(cls, request: Request, settings: Settings) -> Lifetime:
        return cls(time.perf_counter(), deadline_of(request, settings))


async def searched(req: SearchRequest, state: ServiceState, request: Request, life: Lifetime) -> SearchResponse:
    """``req`` answered, within ``life``'s deadline; dropped (ClientGone) if ``request``'s client hangs up first."""
    if req.k > state.settings.max_k:  # the schema's own bound is the absolute one; this service's may be lower
        raise RequestValidationError(
            [
                {
                    "loc": ("body", "k"),
                    "msg": f"Input should be less than or equal to {state.settings.max_k}",
                    "type": "less_than_equal",
                }
            ]
        )
    index = state.search.index_for(req)  # 404 / 400 before any fetching or encoding
    if req.query.image_url is not None:  # once the request is known good; then the path of a base64 image
        req = await with_fetched_image(req, state)
    async with state.admission.admit():
        return await while_connected(request, state.search.search(req, index, life.deadline, life.t0))


async def while_connected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """``work``'s result, unless the client hangs up first: then ``work`` is cancelled, so its queries leave the
    encoder's queue unencoded (ClientGone, which nobody reads). Only once ``request``'s body has been read."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientGone("the client closed the connection before the answer")
    finally:
        gone.cancel()
        task.cancel()


async def disconnected(request: Request) -> None:
    """Returns when the client has gone (its body has been read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post(
    "/v1/search/file", response_model=SearchResponse, responses=ERRORS, summary="Search with an uploaded image"
)
async def search_file(
    file: UploadFile = File(description="the query: an image or audio file"),
    index: str = Form(),
    k: int = Form(10, ge=1, le=MAX_K, description="number of results (at most XMODAL_MAX_K)"),
    modalities: str | None = Form(None, description="comma-separated target modalities, e.g. `image,text`"),
    mode: str = Form("dense"),
    modality: str | None = Form(None, description="`image` or `audio`; default: from the file's type or name"),
    calibration: str | None = Form(None, description="as in /v1/search: raw, zscore, platt, isotonic, centred, rrf"),
    state: ServiceState = Depends(get_state),
    request: Request = None,
) -> Response:
    life = Lifetime.of(request, state.settings)
    data = await file.read()
    if not data:
        raise InvalidInput("the uploaded file is empty")
    modality = modality or upload_modality(file)
    if modality not in ("image", "audio"):
        raise InvalidInput(f"modality must be image or audio, not {modality!r}")
    encoded = await run_in_threadpool(base64.b64encode, data)  # up to XMODAL_MAX_BODY_BYTES: not on the event loop
    try:
        req = SearchRequest(
            index=index,
            query={modality: encoded.decode()},
            k=k,
            mode=mode,
            modalities=[m.strip() for m in modalities.split(",") if m.strip()] if modalities else None,
            calibration=calibration or None,
        )
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    # The same path as a JSON search with a base64 image: same validation, same cache keys.
    return await json_response(await searched(req, state, request, life), large=large_answer(req))


@router.get("/v1/indexes", response_model=IndexList, summary="Published indexes being served")
async def list_served(state: ServiceState = Depends(get_state)) -> IndexList:
    served = state.registry.served  # one snapshot: the indexes and the refusals that belong together
    return IndexList(
        indexes=[
            IndexSummary(
                name=name,
                version=idx.version,
                items=idx.size,
                modalities=idx.modalities,
                model=idx.manifest.model.name,
                faiss=idx.manifest.faiss.key,
                segments=len(idx.manifest.segments),
                late=idx.has_tokens,
                upgrading_from=idx.manifest.upgrade.from_model.name if idx.manifest.upgrade else None,
            )
            for name, idx in sorted(served.indexes.items())
        ],
        refused=served.index_errors,
    )


@router.get(
    "/v1/indexes/{name}",
    response_model=IndexInfo,
    responses=ERRORS,
    summary="The manifest of an index's served version",
)
async def index_info(name: str, state: ServiceState = Depends(get_state)) -> IndexInfo:
    loaded = state.registry.index(name)
    return IndexInfo(
        name=name,
        version=loaded.version,
        device=loaded.device,
        placement=loaded.placement(),
        versions=await run_in_threadpool(IndexDir(state.settings.indexes_dir, name).versions),
        manifest=loaded.manifest.model_dump(),
    )


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: model loaded and warmed, indexes loaded",
    responses={
        503: {
            "description": "not ready: the same body, `ready` false (or, while shutting down, an error)",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
async def readyz(state: ServiceState = Depends(get_state)) -> JSONResponse:
    registry = state.registry.served  # one snapshot: models, indexes and errors that belong together
    ids = registry.model_ids()
    models = [
        {
            "name": ids[fp],
            "fingerprint": fp,
            "dim": q.dim,
            "providers": q.encoder.providers,  # per tower: the providers its session really runs on, read back
            "device": gpu.summary([device_of(active) for active in q.encoder.providers.values()]),  # cuda/cpu/mixed
        }
        for fp, q in registry.models.items()
    ]
    body = {
        "ready": registry.ready(),
        "pid": os.getpid(),  # which worker answered (`xmodal serve --workers N`)
        "model": next((m for m in models if m["fingerprint"] == registry.default), None),
        "models": models,
        "model_error": registry.model_error,
        "model_errors": registry.model_errors,
        "indexes": {
            n: {
                "version": i.version,
                "items": i.size,
                "device": i.device,  # where FAISS searches it: gpu, cpu, or mixed (see placement)
                "placement": i.placement(),  # per segment and modality: device and reason (indexer.gpu)
                "model": ids[i.manifest.model.fingerprint],
            }
            for n, i in registry.indexes.items()
        },
        "devices": state.devices,
        "refused_indexes": registry.index_errors,
        "cache": state.cache.status(),
    }
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}, "description": "Prometheus text format"}},
)
async def metrics(state: ServiceState = Depends(get_state)) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
