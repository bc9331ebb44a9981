"""OpenAI compatibility: ``POST /v1/embeddings`` (texts, images or audio; token vectors on request; Matryoshka
``dimensions`` for models that declare them) and ``GET /v1/models`` (every loaded model). The `openai` client works
against ``http://host:port/v1``. Embeddings go through the chosen model's query encoder, as searches do: the same
limits, caches, decoding budget and micro-batches."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Literal

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from models.encoder import Encoder
from models.errors import InvalidInput
from service.errors import ResponseTooLarge
from service.payloads import decode_base64, input_modality
from service.render import render_in_pieces
from service.routes import ERRORS, while_connected
from service.schemas import RequestBody
from service.state import ServiceState, deadline_of, get_state

router = APIRouter(tags=["OpenAI compatibility"])

MAX_EMBED_TEXTS, MAX_EMBED_MEDIA = 256, 32


class EmbeddingsRequest(RequestBody):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields such as `user`
    input: str | list[str] = Field(description="texts, or images / audio files as base64 or data URIs")
    model: str | None = Field(None, description="a loaded model (GET /v1/models); default: the service's default model")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32")
    modality: Literal["text", "image", "audio"] | None = Field(
        None,
        description="default: image or audio when every input is such a file (a data URI, or raw base64 of a known "
        "image or audio format: PNG, JPEG, GIF, WebP, TIFF, BMP, WAV, FLAC, OGG, MP3), else text",
    )
    dimensions: int | None = Field(
        None, ge=1, description="a shorter embedding: only for models whose manifest declares Matryoshka dimensions"
    )
    tokens: bool = Field(False, description="also return each input's token vectors ([n, dim], real tokens only)")


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="floats, or with `encoding_format: base64` little-endian float32")
    tokens: list[list[float]] | str | None = Field(
        None, description="with `tokens`: the input's token vectors [n, dim], as floats or base64 as `embedding`"
    )


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingsResponse,
    responses=ERRORS,
    summary="OpenAI-compatible embeddings of texts, images or audio",
)
async def embeddings(req: EmbeddingsRequest, request: Request, state: ServiceState = Depends(get_state)) -> Response:
    deadline = deadline_of(request, state.settings)
    queries = state.registry.model(req.model)
    encoder = queries.encoder
    inputs = [req.input] if isinstance(req.input, str) else req.input
    modality = input_modality(inputs, req.modality)
    dims = output_dims(encoder, req.dimensions)
    limit = MAX_EMBED_TEXTS if modality == "text" else MAX_EMBED_MEDIA
    if not inputs or len(inputs) > limit:
        raise InvalidInput(f"input must hold 1 to {limit} {modality} items", param="input")
    if modality == "text":
        queries.check_texts(inputs)
        usage = sum(await run_in_threadpool(encoder.count_tokens, inputs))  # 256 long texts: not on the event loop
        if req.tokens:  # refuse before the work: each token is a dim-float vector in the answer
            check_response_floats((usage + len(inputs)) * encoder.dim, state.settings.max_response_floats)
        items: list[str | bytes] = list(inputs)
    else:  # files of up to XMODAL_MAX_BODY_BYTES: decoded off the event loop
        items = await run_in_threadpool(decoded, inputs)
        usage = 0
    async with state.admission.admit():  # the same query encoder as searches: cache, decoding budget, micro-batches
        found = await while_connected(request, queries.encode(modality, items, deadline, tokens=req.tokens))
    model = state.registry.model_ids()[encoder.fingerprint]
    # Up to XMODAL_MAX_RESPONSE_FLOATS floats (tens of MB of JSON): shaped and rendered in a worker thread.
    body = await run_in_threadpool(
        embeddings_answer, found, req, dims, model, usage, state.settings.max_response_floats
    )
    return Response(body, media_type="application/json")


def embeddings_answer(found: list, req: EmbeddingsRequest, dims: int, model: str, usage: int, max_floats: int) -> bytes:
    """The answer's JSON: each input's vector (Matryoshka: the leading ``dims``, renormalised) and, with
    ``req.tokens``, its token vectors, as floats or base64. ResponseTooLarge past ``max_floats``."""
    if req.tokens:
        vecs = np.stack([f.embedding[0] for f in found])
        tokens = [f.tokens[0] for f in found]
        floats = vecs.size + sum(t.size for t in tokens)
        check_response_floats(floats, max_floats)
    else:
        vecs = np.stack(found)
    if dims != vecs.shape[1]:  # Matryoshka: the leading dims, renormalised
        vecs = vecs[:, :dims] / np.linalg.norm(vecs[:, :dims], axis=1, keepdims=True)
    data = []
    for i, v in enumerate(vecs):
        item = {"object": "embedding", "index": i, "embedding": _encode_floats(v, req.encoding_format)}
        if req.tokens:
            item["tokens"] = _encode_floats(tokens[i], req.encoding_format)
        data.append(item)
    return render_in_pieces(  # an item at a time: each holds at most the model's longest input's token vectors
        {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": usage, "total_tokens": usage}}
    )


def decoded(inputs: list[str]) -> list[bytes]:
    return [decode_base64(x, f"input[{i}]") for i, x in enumerate(inputs)]


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


def check_response_floats(floats: int, limit: int) -> None:
    if floats > limit:
        raise ResponseTooLarge(
            f"the answer would hold {floats:,} floats, over the limit of {limit:,} (XMODAL_MAX_RESPONSE_FLOATS); "
            "send fewer or shorter inputs, or leave out `tokens`",
            param="tokens",
        )


class ModelCard(BaseModel):
    id: str = Field(description="the bundle's name: what `model` takes")
    object: Literal["model"]
    created: int = Field(description="when the bundle was made, Unix seconds")
    owned_by: str
    fingerprint: str
    dim: int
    modalities: list[str]
    matryoshka_dims: list[int] = Field(description="the shorter `dimensions` it can give (Matryoshka)")
    default: bool = Field(description="the model used when a request names none")
    indexes: list[str] = Field(description="the served indexes built with it")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


@router.get("/v1/models", response_model=ModelList, summary="Loaded models (OpenAI shape)")
async def models(state: ServiceState = Depends(get_state)) -> ModelList:
    served = state.registry.served  # one snapshot: the models and indexes that belong together
    ids, indexes = served.model_ids(), served.indexes
    return ModelList(
        object="list",
        data=[
            ModelCard(
                id=ids[fingerprint],
                object="model",
                created=int(dt.datetime.fromisoformat(q.encoder.manifest.created_at).timestamp()),
                owned_by="xmodal",
                fingerprint=fingerprint,
                dim=q.dim,
                modalities=q.encoder.modalities,
                matryoshka_dims=q.encoder.manifest.matryoshka_dims,
                default=fingerprint == served.default,
                indexes=sorted(n for n, i in indexes.items() if i.manifest.model.fingerprint == fingerprint),
            )
            for fingerprint, q in served.models.items()
        ],
    )


def _encode_floats(array: np.ndarray, encoding_format: str) -> np.ndarray | str:
    """float32 as base64 (little-endian), or as an array service.render writes as JSON floats."""
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode()
    return np.ascontiguousarray(array, dtype=np.float32)
