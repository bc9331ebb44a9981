"""Answers rendered to JSON bytes in a worker thread, never on the event loop: a large answer (an embeddings request's
token vectors, a search's heat maps, a clip-retrieval page of base64 pictures) takes tens or hundreds of milliseconds
to render, during which the loop would answer nobody, probes included.

A worker thread alone is not enough: a serializer written in C or Rust holds the GIL for the whole of one call, and
the loop waits for it all the same. So a large answer is rendered in pieces, each list at its top level one item at a
time (an embedding with its token vectors, a search result with its heat maps), and between two pieces the thread
gives the GIL back to the loop (Python switches threads every few milliseconds, but only between bytecodes).

Plain data (dicts, lists, numpy arrays) is written by orjson, numpy arrays directly (float32 as their shortest
float32 form, which reads back as the same float32); pydantic models by pydantic's own serializer. What orjson
cannot write (an integer past 64 bits in an item's metadata) falls back to the standard library. Non-finite floats
are written as null."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson
from fastapi.responses import Response
from pydantic import BaseModel
from pydantic_core import to_json
from starlette.concurrency import run_in_threadpool

OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def render(content: Any) -> bytes:
    """``content`` as JSON bytes (UTF-8, compact), in one call."""
    if isinstance(content, BaseModel):
        return to_json(content)
    try:
        return orjson.dumps(content, default=_model, option=OPTIONS)
    except orjson.JSONEncodeError:
        return json.dumps(content, default=_plain, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def render_in_pieces(content: Any) -> bytes:
    """``content`` as ``render`` writes it, but a list at its top level (the answer itself, or one of its fields)
    one item at a time: no one call holds the GIL for long."""
    if isinstance(content, BaseModel):
        content = {name: getattr(content, name) for name in type(content).model_fields}
    if isinstance(content, dict):
        return b"{" + b",".join([render(str(key)) + b":" + _pieces(value) for key, value in content.items()]) + b"}"
    return _pieces(content)


def _pieces(value: Any) -> bytes:
    if isinstance(value, list):
        return b"[" + b",".join([render(item) for item in value]) + b"]"
    return render(value)


def _model(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON")


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return _model(value)


async def json_response(content: Any, large: bool = True) -> Response:
    """``content`` as an application/json response: rendered in pieces in a worker thread when it may be ``large``,
    else at once (a search of 10 results: a thread hop would cost more than rendering it)."""
    body = await run_in_threadpool(render_in_pieces, content) if large else render(content)
    return Response(body, media_type="application/json")
