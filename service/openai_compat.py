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
from pydantic import ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from models.encoder import Encoder, TokenOutput
from models.errors import InvalidInput
from service.errors import ResponseTooLarge
from service.payloads import decode_base64, input_modality
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
        None, description="default: image or audio when every input is such a data URI, else text"
    )
    dimensions: int | None = Field(
        None, ge=1, description="a shorter embedding: only for models whose manifest declares Matryoshka dimensions"
    )
    tokens: bool = Field(False, description="also return each input's token vectors ([n, dim], real tokens only)")


@router.post("/v1/embeddings", responses=ERRORS, summary="OpenAI-compatible embeddings of texts, images or audio")
async def embeddings(req: EmbeddingsRequest, request: Request, state: ServiceState = Depends(get_state)) -> dict:
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
            check_response_floats(state, (usage + len(inputs)) * encoder.dim)
        items: list[str | bytes] = list(inputs)
    else:
        items = [decode_base64(x, f"input[{i}]") for i, x in enumerate(inputs)]
        usage = 0
    async with state.admission.admit():  # the same query encoder as searches: cache, decoding budget, micro-batches
        found = await while_connected(request, queries.encode(modality, items, deadline, tokens=req.tokens))
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
        "model": state.registry.model_ids()[encoder.fingerprint],
        "usage": {"prompt_tokens": usage, "total_tokens": usage},
    }


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
    served = state.registry.served  # one snapshot: the models and indexes that belong together
    ids, indexes = served.model_ids(), served.indexes
    return {
        "object": "list",
        "data": [
            {
                "id": ids[fingerprint],
                "object": "model",
                "created": int(dt.datetime.fromisoformat(q.encoder.manifest.created_at).timestamp()),
                "owned_by": "xmodal",
                "fingerprint": fingerprint,
                "dim": q.dim,
                "modalities": q.encoder.modalities,
                "matryoshka_dims": q.encoder.manifest.matryoshka_dims,
                "default": fingerprint == served.default,
                "indexes": sorted(n for n, i in indexes.items() if i.manifest.model.fingerprint == fingerprint),
            }
            for fingerprint, q in served.models.items()
        ],
    }


def _encode_floats(array: np.ndarray, encoding_format: str) -> list | str:
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode()
    return array.tolist()
