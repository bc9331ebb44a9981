"""clip-retrieval back-end compatibility: ``POST /knn-service``, ``GET /indices-list`` and ``POST /metadata`` with
the request and response shapes of clip-retrieval's ``clip_back.py``, so that its ``ClipClient`` and clip-front can
be pointed at xmodal.

A thin adapter: a knn query becomes a ``/v1/search`` request (the same validation, encoding, embedding and result
caches, admission and metrics), and its results are reshaped. Bodies are read as JSON whatever their content type,
as clip_back reads them (``get_json(force=True)``): ClipClient posts ``data=json.dumps(...)`` with no content type.

Ids: clip-retrieval's are ints, xmodal's strings. An item's int id is ``tag << 32 | row``: ``row`` is the item's
smallest row number in the served version's items store, ``tag`` 21 bits of the sha256 of the version's name, so
ids stay below 2**53 (exact in JavaScript) and ``/metadata`` refuses an id of another version instead of answering
with whatever item holds that row now.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from indexer.search import LoadedIndex
from models.errors import InvalidInput, NotFound
from service.errors import ClientGone, NotReady
from service.media import MediaNotFound, find_media, media_of
from service.render import json_response
from service.routes import ERRORS, Lifetime, searched
from service.schemas import RequestBody, Result, SearchRequest
from service.state import ServiceState, get_state

router = APIRouter(tags=["clip-retrieval compatibility"])

DUPLICATE_COSINE = 0.94  # clip_back's get_non_uniques threshold
ROW_BITS, TAG_BITS = 32, 21  # 53 bits in all: an int that JavaScript's numbers (clip-front) hold exactly
IMAGE_SIZE = 256  # the `image` column: a JPEG thumbnail this size (a few tens of KB: the answer stays small)


class IdNotServed(NotFound):
    code = "id_not_in_served_version"


class KnnRequest(RequestBody):
    """clip_back's ``/knn-service`` body. Unknown fields are ignored, as clip_back ignores them."""

    model_config = ConfigDict(extra="ignore")
    text: str | None = Field(None, description="a text query (an empty string counts as absent, as in clip_back)")
    image: str | None = Field(None, description="an image file, base64")
    image_url: str | None = Field(None, description="an image to fetch, where XMODAL_FETCH_URLS=true (else 400)")
    embedding_input: list[float] | None = Field(None, description="a query vector in the model's space")
    modality: Literal["image", "text"] = Field("image", description="the target: the image rows or the text rows")
    num_images: int = Field(100, ge=0, description="results that carry their metadata columns")
    num_result_ids: int | None = Field(
        None, ge=0, description="results in all (default num_images; at most XMODAL_MAX_K): ids and similarities"
    )
    indice_name: str | None = Field(None, description="the index; default the first served index")
    use_mclip: bool | None = Field(False, description="refused when true: this service has no multilingual text tower")
    deduplicate: bool | None = Field(
        False, description="drop results whose vector is a near duplicate (cosine > 0.94) of a better one's"
    )
    use_safety_model: bool | None = Field(None, description="ignored: no safety model is served")
    use_violence_detector: bool | None = Field(None, description="ignored: no violence detector is served")
    aesthetic_score: Any = Field(None, description="ignored: no aesthetic embeddings are served")
    aesthetic_weight: Any = Field(None, description="ignored: no aesthetic embeddings are served")


class MetadataRequest(RequestBody):
    model_config = ConfigDict(extra="ignore")
    ids: list[int] = Field(description="int ids from /knn-service answers")
    indice_name: str = Field(min_length=1)


class KnnResult(BaseModel):
    """One /knn-service result: the item's metadata columns (its metadata fields, `caption`, `url` where it has one,
    `image` as base64 JPEG for a local picture, `xmodal_id`) for the first `num_images` results, then only `id` and
    `similarity`."""

    model_config = ConfigDict(extra="allow")
    id: int = Field(description="the item's int id in the served version (tag << 32 | row)")
    similarity: float


class MetadataEntry(BaseModel):
    id: int
    metadata: dict[str, Any] = Field(description="the item's metadata columns, as in a /knn-service result")


def post_route(path: str, body: type[BaseModel], answer: Any, summary: str) -> Callable:
    """A POST route that reads its body itself (JSON under any content type), documented as the JSON ``body``."""
    schema = {"requestBody": {"required": True, "content": {"application/json": {"schema": body.model_json_schema()}}}}
    return router.post(
        path,
        response_model=answer,
        responses=ERRORS,
        openapi_extra=schema,
        summary=f"{summary} (a JSON body, with or without a JSON content type)",
    )


async def read_body(request: Request, model: type[RequestBody]) -> Any:
    """The body parsed as JSON whatever its content type, validated as ``model``: errors shaped as on the JSON
    routes (400 malformed JSON, 422 naming the field)."""
    try:
        data = json.loads(await request.body())
    except ClientDisconnect:  # gone before its body was read: nothing to answer (499, as a search's client gone)
        raise ClientGone("the client closed the connection before its body was read") from None
    except (ValueError, RecursionError):  # ValueError: bad JSON, or bytes that are not UTF-8
        invalid = {"type": "json_invalid", "loc": ("body", 0), "msg": "JSON decode error"}
        raise RequestValidationError([invalid]) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def version_tag(version: str) -> int:
    return int.from_bytes(hashlib.sha256(version.encode()).digest()[:3], "big") >> (24 - TAG_BITS)


def clip_id(version: str, row: int) -> int:
    return version_tag(version) << ROW_BITS | row


def served_rows(index: LoadedIndex, ids: list[int]) -> list[int]:
    """The rows of ``ids`` in ``index``'s version, or IdNotServed naming those of another version."""
    tag, mask = version_tag(index.version), (1 << ROW_BITS) - 1
    stale = [i for i in ids if i < 0 or i >> ROW_BITS != tag or (i & mask) >= index.size]
    if stale:
        raise IdNotServed(
            f"ids {stale[:5]} are not ids of index {index.name!r} version {index.version} (the served one): an id "
            "holds the version that answered it; search again",
            ids=stale[:100],
        )
    return [i & mask for i in ids]


def search_request(req: KnnRequest, index: str, k: int) -> SearchRequest:
    """The /v1/search request of a knn query: the first of text, image, image_url, embedding_input, as clip_back."""
    if req.use_mclip:
        raise InvalidInput("use_mclip: this service has no multilingual text tower; send use_mclip false")
    if req.text:
        query: dict = {"text": req.text}
    elif req.image is not None:
        query = {"image": req.image}
    elif req.image_url is not None:
        query = {"image_url": req.image_url}  # fetched by /v1/search, where fetching is on
    elif req.embedding_input is not None:
        query = {"embedding": req.embedding_input}
    else:
        raise InvalidInput("send one of text, image or embedding_input")
    try:
        return SearchRequest(index=index, query=query, k=k, modalities=[req.modality])
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def deduplicated(index: LoadedIndex, results: list[Result], modality: str) -> list[Result]:
    """``results`` less the near duplicates of better ones, as clip_back's ``connected_components_dedup``: results
    whose matched rows' vectors have a cosine above 0.94 are linked, and of each connected group only the best
    ranked is kept. Unchanged where the index cannot give its vectors back. Runs in a worker thread."""
    rows = index.items.rows_of([r.id for r in results], modality)
    vectors = index.vectors([rows[r.id] for r in results]) if len(results) > 1 else None
    if vectors is None:
        return results
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    _, group = connected_components(csr_matrix(vectors @ vectors.T > DUPLICATE_COSINE), directed=False)
    best = np.unique(group, return_index=True)[1]  # each group's first position: its best-ranked result
    return [results[i] for i in sorted(best)]


def pictures(state: ServiceState, index: LoadedIndex, ids: list[str]) -> dict[str, str]:
    """The `image` column (base64 JPEG) of each of ``ids`` with a picture on disk, as clip_back converts a local
    item's `image_path`; none when the service does not serve media. Runs in a worker thread."""
    if not state.settings.serve_media or not ids:
        return {}
    encoder = state.registry.encoder_for(index)
    out = {}
    for item_id in ids:
        try:
            media = find_media(index, item_id, "image")
            jpeg = state.media.thumbnail(index, encoder, media, item_id, IMAGE_SIZE)
        except MediaNotFound:  # the file is gone or cannot be decoded: the result comes without its picture
            continue
        out[item_id] = base64.b64encode(jpeg).decode()
    return out


def columns(item_id: str, text: str | None, metadata: dict, image: str | None) -> dict:
    """clip_back's metadata columns of an item: its metadata fields (`url` among them when it has one), its caption,
    its picture, and xmodal's own id."""
    out = dict(metadata)
    if text is not None:
        out.setdefault("caption", text)
    if image is not None:
        out["image"] = image
    out["xmodal_id"] = item_id
    return out


async def served_search(
    req: SearchRequest, state: ServiceState, request: Request, life: Lifetime
) -> tuple[list[Result], LoadedIndex]:
    """The search's results and the version that answered them (searched again if a new one was swapped in
    meanwhile, so that rows are always read from the version that ranked them); both within the request's one
    deadline, counted from its arrival, and dropped if its client hangs up."""
    for _ in range(2):
        response = await searched(req, state, request, life)
        index = state.registry.index(req.index)
        if index.version == response.index_version:
            return response.results, index
    raise NotReady(f"index {req.index!r} was republished twice during this request; retry")


@post_route(
    "/knn-service", KnnRequest, list[KnnResult], "clip-retrieval: nearest neighbours of a text, image or vector"
)
async def knn_service(request: Request, state: ServiceState = Depends(get_state)) -> Response:
    life = Lifetime.of(request, state.settings)  # before the body is read: the deadline counts from arrival anyway
    req = await read_body(request, KnnRequest)
    name = req.indice_name or next(iter(sorted(state.registry.indexes)), "")
    state.registry.index(name)  # an unknown index is a 404 before anything else
    total = req.num_images if req.num_result_ids is None else req.num_result_ids
    k = min(total, state.settings.max_k)
    search_req = search_request(req, name, max(k, 1))
    if k == 0:
        return await json_response([], large=False)
    results, index = await served_search(search_req, state, request, life)
    if req.deduplicate:
        results = await run_in_threadpool(deduplicated, index, results, req.modality)
    rows = await run_in_threadpool(index.items.first_rows, [r.id for r in results])
    detailed = results[: req.num_images]
    images = await run_in_threadpool(pictures, state, index, [r.id for r in detailed if "image" in (r.media or [])])
    out = []
    for i, r in enumerate(results):
        entry = columns(r.id, r.text, r.metadata, images.get(r.id)) if i < len(detailed) else {}
        entry["id"] = clip_id(index.version, rows[r.id])
        entry["similarity"] = r.similarity
        out.append(entry)
    return await json_response(out)  # pictures and metadata of up to XMODAL_MAX_K results: rendered off the loop


@router.get("/indices-list", response_model=list[str], summary="clip-retrieval: the names of the served indexes")
async def indices_list(state: ServiceState = Depends(get_state)) -> list[str]:
    return sorted(state.registry.indexes)


@post_route(
    "/metadata",
    MetadataRequest,
    list[MetadataEntry],
    "clip-retrieval: the metadata columns of int ids from /knn-service",
)
async def metadata(request: Request, state: ServiceState = Depends(get_state)) -> Response:
    req = await read_body(request, MetadataRequest)
    if not req.ids:
        return await json_response([], large=False)  # as clip_back, before looking at the index
    if len(req.ids) > state.settings.max_k:
        raise InvalidInput(f"ids holds {len(req.ids)} ids; the limit is {state.settings.max_k}")
    index = state.registry.index(req.indice_name)
    rows = served_rows(index, req.ids)
    found = await run_in_threadpool(index.items.get, sorted(set(rows)))
    ids = [found[row]["id"] for row in rows]
    media = await run_in_threadpool(media_of, index, ids)
    images = await run_in_threadpool(pictures, state, index, [i for i in ids if "image" in media.get(i, [])])
    return await json_response(
        [
            {
                "id": cid,
                "metadata": columns(found[row]["id"], found[row]["text"], found[row]["metadata"], images.get(iid)),
            }
            for cid, row, iid in zip(req.ids, rows, ids, strict=True)
        ]
    )
