"""HTTP routes. Thin: validate, call the state / indexer, shape the response."""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import json
import os
import re
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from indexer.corpus import AUDIO_SUFFIXES
from indexer.layout import IndexDir
from indexer.search import Hit, LateRequest, LoadedIndex
from models.encoder import Encoder, TokenOutput
from models.errors import InvalidInput
from service.cache import result_key
from service.errors import ClientGone, ResponseTooLarge
from service.explain import describe
from service.fetch import with_fetched_image
from service.media import media_of
from service.schemas import (
    MAX_K,
    ErrorResponse,
    LateOptions,
    RequestBody,
    Result,
    SearchRequest,
    SearchResponse,
    TokenMatch,
)
from service.state import ServiceState, get_state, now_ms

ERRORS = {status: {"model": ErrorResponse} for status in (400, 404, 413, 415, 422, 429, 503)}
router = APIRouter()
T = TypeVar("T")


@router.post(
    "/v1/search", response_model=SearchResponse, responses=ERRORS, summary="Search an index with a text or vector query"
)
async def search(
    req: SearchRequest, state: ServiceState = Depends(get_state), request: Request = None
) -> SearchResponse:
    t0 = time.perf_counter()
    settings = state.settings
    if req.k > settings.max_k:  # the schema's own bound is the absolute one; this service's may be lower
        raise RequestValidationError(
            [
                {
                    "loc": ("body", "k"),
                    "msg": f"Input should be less than or equal to {settings.max_k}",
                    "type": "less_than_equal",
                }
            ]
        )
    index = state.index(req.index)
    if req.mode == "late":
        index.require_tokens()  # before any encoding
        if req.query.embedding is not None:
            raise InvalidInput("`mode: late` needs a text, image or audio query: a raw embedding has no token vectors")
    if req.query.image_url is not None:  # once the request is known good; then the path of a base64 image
        req = await with_fetched_image(req, state)
    encoder = state.require_encoder()
    async with state.admission.admit():
        results, cached = await while_connected(request, answer(req, index, state))
    took = now_ms(t0)
    state.metrics.search_seconds.labels(str(cached).lower()).observe(took / 1000)
    return SearchResponse(
        results=results,
        index=index.name,
        index_version=index.version,
        model=encoder.name,
        mode=req.mode,
        calibration=applied_calibration(req, index),
        cached=cached,
        took_ms=took,
    )


async def answer(req: SearchRequest, index: LoadedIndex, state: ServiceState) -> tuple[list[Result], bool]:
    """The results of a search, and whether they came from the result cache."""
    settings = state.settings
    key = result_key(index.name, index.version, req.model_dump(mode="json"))
    raw = await state.cache.get(key)
    cached = raw is not None
    state.metrics.cache.labels("result", "hit" if cached else "miss").inc()
    if cached:
        results = [Result(**r) for r in json.loads(raw)]
    elif req.mode == "late":
        results = await late_results(req, index, state)
    else:
        if req.query.text is not None:
            vec = await state.text_vector(req.query.text)
        elif req.query.image is not None:
            vec = await state.media_vector("image", decode_base64(req.query.image, "query.image"))
        elif req.query.audio is not None:
            vec = await state.media_vector("audio", decode_base64(req.query.audio, "query.audio"))
        else:
            vec = state.given_vector(req.query.embedding or [])
        hits, media = await run_in_threadpool(
            hits_and_media,
            index,
            index.search,
            vec,
            req.k,
            req.modalities,
            req.filter,
            req.query.modality,
            req.calibration,
        )
        results = [result(h, media=media.get(h.id)) for h in hits]
    if not cached:
        payload = json.dumps([r.model_dump(exclude_none=True) for r in results]).encode()
        await state.cache.set(key, payload, settings.result_ttl_s)
    return results, cached


async def while_connected(request: Request | None, work: Coroutine[Any, Any, T]) -> T:
    """``work``'s result, unless the client hangs up first: then ``work`` is cancelled, so its queries leave the
    encoder's queue unencoded (ClientGone, which nobody reads)."""
    if request is None:  # called from another route, which watches its own client
        return await work
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


def applied_calibration(req: SearchRequest, index: LoadedIndex) -> str | None:
    """The calibration that mixes the request's target modalities (None when there is one list to rank)."""
    targets = sorted(set(req.modalities or index.modalities))
    if len(targets) < 2 or (req.mode == "late" and req.late is not None and req.late.scope == "all"):
        return None
    return index.fusion(req.calibration, req.query.modality, targets, req.mode).method


async def late_results(req: SearchRequest, index: LoadedIndex, state: ServiceState) -> list[Result]:
    """Late interaction: the query's token vectors, MaxSim over the token store, explained on request."""
    if req.query.text is not None:
        out = await state.text_tokens(req.query.text)
    else:
        modality = "image" if req.query.image is not None else "audio"
        out = await state.media_tokens(modality, decode_base64(getattr(req.query, modality), f"query.{modality}"))
    options = req.late or LateOptions()
    query = LateRequest(
        out.tokens[0], out.embedding[0], options.params(), explain=options.explain, heatmap=options.heatmap
    )
    hits, media = await run_in_threadpool(
        hits_and_media,
        index,
        index.search_late,
        query,
        req.k,
        req.modalities,
        req.filter,
        req.query.modality,
        req.calibration,
    )
    encoder = state.require_encoder()
    pooled = (index.manifest.tokens or {}).get("pool_factor", 1) > 1
    return [
        result(h, describe(h, encoder, req.query.text, pooled) if options.explain else None, media.get(h.id))
        for h in hits
    ]


def hits_and_media(index: LoadedIndex, search: Callable[..., list[Hit]], *args: object) -> tuple[list[Hit], dict]:
    """A search and which of its items have media to show, in one trip to the thread pool."""
    hits = search(*args)
    return hits, media_of(index, [h.id for h in hits])


def result(hit: Hit, matches: list[TokenMatch] | None = None, media: list[str] | None = None) -> Result:
    return Result(
        id=hit.id,
        score=hit.score,
        similarity=hit.similarity,
        modality=hit.modality,
        text=hit.text,
        metadata=hit.metadata,
        matches=matches,
        media=media,
    )


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
) -> SearchResponse:
    data = await file.read()
    if not data:
        raise InvalidInput("the uploaded file is empty")
    modality = modality or upload_modality(file)
    if modality not in ("image", "audio"):
        raise InvalidInput(f"modality must be image or audio, not {modality!r}")
    try:
        req = SearchRequest(
            index=index,
            query={modality: base64.b64encode(data).decode()},
            k=k,
            mode=mode,
            modalities=[m.strip() for m in modalities.split(",") if m.strip()] if modalities else None,
            calibration=calibration or None,
        )
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    # The same path as a JSON search with a base64 image: same validation, same cache keys.
    return await search(req, state, request)


def upload_modality(file: UploadFile) -> str:
    """audio for an audio/* content type or an audio file extension, else image."""
    if (file.content_type or "").startswith("audio/"):
        return "audio"
    return "audio" if Path(file.filename or "").suffix.lower() in AUDIO_SUFFIXES else "image"


def decode_base64(value: str, field: str) -> bytes:
    """Raw base64 or a data URI (``data:image/png;base64,...``)."""
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if not header.endswith(";base64"):
            raise InvalidInput(f"{field}: only base64 data URIs are supported")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{field} is not valid base64") from None
    if not data:
        raise InvalidInput(f"{field} is empty")
    return data


MAX_EMBED_TEXTS, MAX_EMBED_MEDIA = 256, 32


class EmbeddingsRequest(RequestBody):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields such as `user`
    input: str | list[str] = Field(description="texts, or images / audio files as base64 or data URIs")
    model: str | None = Field(None, description="must name the loaded model when given")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32")
    modality: Literal["text", "image", "audio"] | None = Field(
        None, description="default: image or audio when every input is such a data URI, else text"
    )
    dimensions: int | None = Field(
        None, ge=1, description="a shorter embedding: only for models whose manifest declares Matryoshka dimensions"
    )
    tokens: bool = Field(False, description="also return each input's token vectors ([n, dim], real tokens only)")


@router.post("/v1/embeddings", responses=ERRORS, summary="OpenAI-compatible embeddings of texts, images or audio")
async def embeddings(req: EmbeddingsRequest, request: Request, state: ServiceState = Depends(get_state)) -> dict:
    encoder = state.require_encoder()
    if req.model not in (None, encoder.name):
        raise InvalidInput(f"model {req.model!r} is not loaded; this service runs {encoder.name!r}")
    inputs = [req.input] if isinstance(req.input, str) else req.input
    modality = input_modality(inputs, req.modality)
    dims = output_dims(encoder, req.dimensions)
    limit = MAX_EMBED_TEXTS if modality == "text" else MAX_EMBED_MEDIA
    if not inputs or len(inputs) > limit:
        raise InvalidInput(f"input must hold 1 to {limit} {modality} items", param="input")
    if modality == "text":
        if any(not t.strip() or len(t) > state.settings.max_text_chars for t in inputs):
            raise InvalidInput(f"every input must be non-empty and at most {state.settings.max_text_chars} characters")
        usage = sum(await run_in_threadpool(encoder.count_tokens, inputs))  # 256 long texts: not on the event loop
        if req.tokens:  # refuse before the work: each token is a dim-float vector in the answer
            check_response_floats(state, (usage + len(inputs)) * encoder.dim)
        items: list[str | bytes] = list(inputs)
    else:
        items = [decode_base64(x, f"input[{i}]") for i, x in enumerate(inputs)]
        usage = 0
    async with state.admission.admit():  # the same query encoder as searches: cache, decoding budget, micro-batches
        found = await while_connected(request, state.encode(modality, items, tokens=req.tokens))
    if req.tokens:
        vecs = np.stack([f.embedding[0] for f in found])
        out = TokenOutput(vecs, [f.tokens[0] for f in found])
        check_response_floats(state, vecs.size + sum(t.size for t in out.tokens))
    else:
        vecs = np.stack(found)
    if dims != encoder.dim:  # Matryoshka: the leading dims, renormalised
        vecs = vecs[:, :dims] / np.linalg.norm(vecs[:, :dims], axis=1, keepdims=True)
    data = []
    for i, v in enumerate(vecs):
        item = {"object": "embedding", "index": i, "embedding": _encode_floats(v, req.encoding_format)}
        if req.tokens:
            item["tokens"] = _encode_floats(out.tokens[i], req.encoding_format)
        data.append(item)
    return {
        "object": "list",
        "data": data,
        "model": encoder.name,
        "usage": {"prompt_tokens": usage, "total_tokens": usage},
    }


MEDIA_URI = re.compile(r"^data:(image|audio)/[\w.+-]+;base64,", re.IGNORECASE)


def input_modality(inputs: list[str], given: str | None) -> str:
    """The inputs' modality: as given, or image/audio when every input is such a data URI, else text. An image or
    audio data URI among texts is refused, not embedded as text."""
    kinds = {m.group(1).lower() if (m := MEDIA_URI.match(x)) else "text" for x in inputs}
    if given is None:
        if len(kinds) > 1:
            raise InvalidInput(f"input mixes {sorted(kinds)}: one modality per request", param="input")
        return kinds.pop() if kinds else "text"
    if given == "text" and kinds - {"text"}:
        raise InvalidInput(
            f"input holds {'/'.join(sorted(kinds - {'text'}))} data URIs: set `modality` to embed them",
            param="modality",
        )
    return given


def output_dims(encoder: Encoder, wanted: int | None) -> int:
    if wanted is None or wanted == encoder.dim:
        return encoder.dim
    allowed = encoder.manifest.matryoshka_dims
    if wanted not in allowed:
        how = f"can be shortened to {allowed}" if allowed else "is not declared Matryoshka, so it cannot be shortened"
        raise InvalidInput(
            f"model {encoder.name} gives {encoder.dim}-dimensional embeddings and {how}; omit `dimensions`",
            param="dimensions",
        )
    return wanted


def check_response_floats(state: ServiceState, floats: int) -> None:
    limit = state.settings.max_response_floats
    if floats > limit:
        raise ResponseTooLarge(
            f"the answer would hold {floats:,} floats, over the limit of {limit:,} (XMODAL_MAX_RESPONSE_FLOATS); "
            "send fewer or shorter inputs, or leave out `tokens`",
            param="tokens",
        )


@router.get("/v1/models", summary="Loaded models (OpenAI shape)")
async def models(state: ServiceState = Depends(get_state)) -> dict:
    encoder = state.require_encoder()
    return {
        "object": "list",
        "data": [
            {
                "id": encoder.name,
                "object": "model",
                "created": int(dt.datetime.fromisoformat(encoder.manifest.created_at).timestamp()),
                "owned_by": "xmodal",
                "fingerprint": encoder.fingerprint,
                "dim": encoder.dim,
                "modalities": encoder.modalities,
                "matryoshka_dims": encoder.manifest.matryoshka_dims,
            }
        ],
    }


def _encode_floats(array: np.ndarray, encoding_format: str) -> list | str:
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode()
    return array.tolist()


@router.get("/v1/indexes", summary="Published indexes being served")
async def list_served(state: ServiceState = Depends(get_state)) -> dict:
    return {
        "indexes": [
            {
                "name": name,
                "version": idx.version,
                "items": idx.size,
                "modalities": idx.modalities,
                "model": idx.manifest.model.name,
                "faiss": idx.manifest.faiss.key,
                "segments": len(idx.manifest.segments),
                "late": idx.has_tokens,
            }
            for name, idx in sorted(state.indexes.items())
        ],
        "refused": state.index_errors,
    }


@router.get("/v1/indexes/{name}", responses=ERRORS, summary="The manifest of an index's served version")
async def index_info(name: str, state: ServiceState = Depends(get_state)) -> dict:
    loaded = state.index(name)
    return {
        "name": name,
        "version": loaded.version,
        "device": loaded.device,
        "versions": IndexDir(state.settings.indexes_dir, name).versions(),
        "manifest": loaded.manifest.model_dump(),
    }


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: model loaded and warmed, indexes loaded",
    responses={
        503: {
            "description": "not ready: the same body, `ready` false (or, while shutting down, an error)",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
async def readyz(state: ServiceState = Depends(get_state)) -> JSONResponse:
    enc = state.encoder
    body = {
        "ready": state.ready(),
        "pid": os.getpid(),  # which worker answered (`xmodal serve --workers N`)
        "model": None
        if enc is None
        else {"name": enc.name, "fingerprint": enc.fingerprint, "dim": enc.dim, "providers": enc.providers},
        "model_error": state.model_error,
        "indexes": {n: {"version": i.version, "items": i.size, "device": i.device} for n, i in state.indexes.items()},
        "refused_indexes": state.index_errors,
        "cache": state.cache.status(),
    }
    return JSONResponse(body, status_code=200 if state.ready() else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}, "description": "Prometheus text format"}},
)
async def metrics(state: ServiceState = Depends(get_state)) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
