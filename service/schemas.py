"""Request and response bodies of the HTTP API (the contract in DESIGN.md)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Modality = Literal["text", "image", "audio"]


class Query(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, description="a text query")
    image: str | None = Field(None, description="an image file, base64 or as a data URI (data:image/png;base64,...)")
    audio: str | None = Field(None, description="an audio file (WAV, FLAC, OGG, MP3), base64 or as a data URI")
    embedding: list[float] | None = Field(None, description="a query vector in the model's space")

    @field_validator("text")
    @classmethod
    def _text_not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("query.text must not be empty")
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> Query:
        given = [name for name in ("text", "image", "audio", "embedding") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("query needs exactly one of `text`, `image`, `audio` or `embedding`")
        return self

    @property
    def modality(self) -> str | None:
        """The query's modality; None for a raw embedding (whose modality the service cannot know)."""
        return next((m for m in ("text", "image", "audio") if getattr(self, m) is not None), None)


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: str = Field(min_length=1, max_length=64)
    query: Query
    k: int = Field(10, ge=1, description="number of results (at most XMODAL_MAX_K)")
    modalities: list[Modality] | None = Field(None, description="target modalities; default all the index holds")
    mode: Literal["dense", "late"] = "dense"
    filter: dict[str, Any] | None = Field(
        None, description="metadata equality filter: {field: value} or {field: [any, of, these]}"
    )


class Result(BaseModel):
    id: str
    score: float = Field(description="ranking score: the cosine, or a per-modality z-score when results mix modalities")
    similarity: float = Field(description="cosine similarity of the query and the matched row")
    modality: str
    text: str | None = None
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    results: list[Result]
    index: str
    index_version: str
    model: str
    mode: str
    cached: bool
    took_ms: float


class ErrorBody(BaseModel):
    code: str
    message: str
    details: dict[str, Any] = {}


class ErrorResponse(BaseModel):
    error: ErrorBody
