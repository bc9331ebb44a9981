"""The search page at ``/`` (plain HTML, CSS and JS from ``service/static``, nothing from a CDN) and the routes that
show an index's own items: the media file, a thumbnail, a waveform. Items are named by id and looked up in the
served version; no path from a request ever reaches the file system."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import AfterValidator
from starlette.concurrency import run_in_threadpool

from indexer.search import LoadedIndex
from models.encoder import Encoder
from service.media import MediaFile, MediaNotFound, find_media
from service.schemas import ErrorResponse
from service.state import ServiceState, get_state

STATIC = Path(__file__).parent / "static"
# The page runs only its own script and talks only to this service; media may be shown from blob: URLs (uploads).
PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
    "style-src 'self'; script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}
MEDIA_CACHE = "public, max-age=3600"
THUMB_SIZES = (64, 128, 256, 512)
ERRORS = {status: {"model": ErrorResponse} for status in (400, 404, 422, 503)}
MEDIA_HEADERS = {  # sent with every file, rendering and 304
    name: {"description": description, "required": True, "schema": {"type": "string"}}
    for name, description in (
        ("ETag", "the file's (or rendering's) tag, for If-None-Match"),
        ("Cache-Control", MEDIA_CACHE),
    )
}


def media_responses(*media_types: str) -> dict:
    """A media route's answers: the file (one of ``media_types``), or 304 for an If-None-Match of its ETag."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {
        **ERRORS,
        200: {"content": dict.fromkeys(media_types, binary), "headers": MEDIA_HEADERS},
        304: {"description": "Not Modified: If-None-Match named the current ETag", "headers": MEDIA_HEADERS},
    }


router = APIRouter()
ItemId = Query(min_length=1, max_length=1024, description="the item's id in the index")


def mount_static(app) -> None:  # noqa: ANN001 - a FastAPI app
    app.mount("/static", StaticFiles(directory=STATIC), name="static")


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


async def _media(state: ServiceState, name: str, item_id: str, modality: str) -> tuple[LoadedIndex, MediaFile]:
    if not state.settings.serve_media:
        raise MediaNotFound("this service does not serve media (XMODAL_SERVE_MEDIA=false)")
    index = state.registry.index(name)
    return index, await run_in_threadpool(find_media, index, item_id, modality)


def _headers(etag: str) -> dict[str, str]:
    return {"etag": etag, "cache-control": MEDIA_CACHE, "x-content-type-options": "nosniff"}


def _not_modified(request: Request, etag: str) -> Response | None:
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=_headers(etag))
    return None


async def _rendered(
    request: Request, state: ServiceState, name: str, item_id: str, modality: str, tag: str, render: Callable
) -> Response:
    """A picture rendered from an item's file (cached by index version), with its own ETag."""
    index, found = await _media(state, name, item_id, modality)
    etag = f'{found.etag[:-1]}-{tag}"'
    if (hit := _not_modified(request, etag)) is not None:
        return hit
    content, media_type = await run_in_threadpool(render, index, state.registry.encoder_for(index), found)
    return Response(content, media_type=media_type, headers=_headers(etag))


@router.get(
    "/v1/indexes/{name}/media",
    responses=media_responses("image/*", "audio/*"),
    summary="An item's own image or audio file (by item id)",
    response_class=FileResponse,
)
async def media(
    request: Request,
    name: str,
    id: str = ItemId,
    modality: Literal["image", "audio"] = Query("image"),
    state: ServiceState = Depends(get_state),
) -> Response:
    _, found = await _media(state, name, id, modality)
    if (hit := _not_modified(request, found.etag)) is not None:
        return hit
    return FileResponse(
        found.path, media_type=found.content_type, headers=_headers(found.etag), content_disposition_type="inline"
    )


def _thumb_size(size: int) -> int:
    if size not in THUMB_SIZES:
        raise ValueError(f"size must be one of {list(THUMB_SIZES)}")
    return size


@router.get(
    "/v1/indexes/{name}/thumbnail",
    responses=media_responses("image/jpeg"),
    summary="A square JPEG of an item's image as the model sees it (its centre crop)",
    response_class=Response,
)
async def thumbnail(
    request: Request,
    name: str,
    id: str = ItemId,
    size: Annotated[
        int,
        Query(description="pixels a side", json_schema_extra={"enum": list(THUMB_SIZES)}),
        AfterValidator(_thumb_size),
    ] = 256,
    state: ServiceState = Depends(get_state),
) -> Response:
    def render(index: LoadedIndex, encoder: Encoder, found: MediaFile) -> tuple[bytes, str]:
        return state.media.thumbnail(index, encoder, found, id, size), "image/jpeg"

    return await _rendered(request, state, name, id, "image", f"t{size}", render)


@router.get(
    "/v1/indexes/{name}/waveform",
    responses=media_responses("image/png"),
    summary="A PNG of an item's sound over the audio tower's clip window",
    response_class=Response,
)
async def waveform(request: Request, name: str, id: str = ItemId, state: ServiceState = Depends(get_state)) -> Response:
    def render(index: LoadedIndex, encoder: Encoder, found: MediaFile) -> tuple[bytes, str]:
        return state.media.waveform(index, encoder, found, id), "image/png"

    return await _rendered(request, state, name, id, "audio", "w", render)
