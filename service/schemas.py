"""Request and response bodies of the HTTP API (the contract in DESIGN.md)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from indexer.late import LateParams

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


class LateOptions(BaseModel):
    """How `mode: late` searches (PLAID-like: centroid candidates, centroid scores, exact MaxSim)."""

    model_config = ConfigDict(extra="forbid")
    depth: int = Field(
        LateParams.depth, ge=1, le=10_000, description="candidate depth: items scored exactly on their token vectors"
    )
    candidates: int = Field(
        LateParams.candidates, ge=1, le=1_000_000, description="rows kept from the query tokens' centroid lists"
    )
    nprobe: int = Field(LateParams.nprobe, ge=1, le=65_536, description="centroids probed per query token")
    scope: Literal["modality", "all"] = Field(
        LateParams.scope,
        description="modality: score each of an item's modalities apart and keep the best (calibrated when several); "
        "all: score the union of its tokens",
    )
    symmetric: bool = Field(LateParams.symmetric, description="average FILIP's two directions (query→item, item→query)")
    explain: bool = Field(False, description="return each query token's best-matching item token (word, patch, frame)")

    def params(self) -> LateParams:
        return LateParams(
            depth=self.depth, candidates=self.candidates, nprobe=self.nprobe, scope=self.scope, symmetric=self.symmetric
        )


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: str = Field(min_length=1, max_length=64)
    query: Query
    k: int = Field(10, ge=1, description="number of results (at most XMODAL_MAX_K)")
    modalities: list[Modality] | None = Field(None, description="target modalities; default all the index holds")
    mode: Literal["dense", "late"] = Field(
        "dense", description="dense: one vector per item; late: token-wise MaxSim (FILIP), on indexes built with --late"
    )
    filter: dict[str, Any] | None = Field(
        None, description="metadata equality filter: {field: value} or {field: [any, of, these]}"
    )
    late: LateOptions | None = Field(None, description="options of `mode: late` (default: the index's defaults)")
    calibration: Literal["raw", "zscore", "platt", "isotonic", "centred", "rrf"] | None = Field(
        None,
        description="how results of several target modalities are put on one scale (indexer.calibration): isotonic "
        "or platt (probability of relevance, fitted at build time), zscore, centred (mean-centred cosine), rrf "
        "(reciprocal-rank fusion), raw (cosine); default: the index's (isotonic), or zscore / raw for an index "
        "built without the fits",
    )

    @model_validator(mode="after")
    def _late_options_need_late_mode(self) -> SearchRequest:
        if self.late is not None and self.mode != "late":
            raise ValueError("`late` options apply to `mode: late` only")
        return self


class TokenMatch(BaseModel):
    """Why a late result ranked: one query token and the item token it matched best."""

    query_token: int = Field(description="position of the token in the query")
    query_text: str | None = Field(None, description="the query token's text, for a text query")
    modality: str = Field(description="the modality of the matched item token")
    item_token: int = Field(description="position of the matched token in that modality's token set")
    where: str = Field(description="the matched token: a word, an image patch, an audio frame span")
    similarity: float


class Result(BaseModel):
    id: str
    score: float = Field(
        description="ranking score, comparable across modalities: with several target modalities, the similarity "
        "calibrated for its (query, target) modality pair (default: the probability that the item is relevant); with "
        "one, the similarity itself"
    )
    similarity: float = Field(description="cosine similarity of the query and the matched row (late: MaxSim score)")
    modality: str = Field(description="the matched row's modality (late scope all: the modalities scored, a+b)")
    text: str | None = None
    metadata: dict[str, Any]
    matches: list[TokenMatch] | None = Field(None, description="late search with explain: per query token")


class SearchResponse(BaseModel):
    results: list[Result]
    index: str
    index_version: str
    model: str
    mode: str
    calibration: str | None = Field(
        None, description="the calibration that mixed the target modalities (after any fallback); null for one target"
    )
    cached: bool
    took_ms: float


class ErrorBody(BaseModel):
    code: str
    message: str
    details: dict[str, Any] = {}


class ErrorResponse(BaseModel):
    error: ErrorBody
