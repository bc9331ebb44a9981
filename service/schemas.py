"""Request and response bodies of the HTTP API (the contract in DESIGN.md)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from indexer.late.pipeline import LateParams

Modality = Literal["text", "image", "audio"]
MAX_K = 10_000  # the most results any service answers; XMODAL_MAX_K may set less
MAX_JSON_DEPTH = 16  # far above any request this API defines; deep nesting only costs the server


def check_json(value: Any, where: str = "body", depth: int = 0) -> None:
    """What JSON allows but no request means: nesting deeper than MAX_JSON_DEPTH, and strings that are not
    Unicode (a lone surrogate escape such as "\\ud800", which cannot be encoded, hashed or tokenized). A
    ValueError, so a 422 that names the field, before any other validation."""
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{where}: nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where}: not valid Unicode (a lone surrogate such as \\ud800)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_json(key, f"{where} (a key)", depth + 1)
            check_json(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_json(item, f"{where}[{i}]", depth + 1)


class RequestBody(BaseModel):
    """A JSON request body: unknown fields refused, and checked by ``check_json`` first."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _plain_json(cls, data: Any) -> Any:
        check_json(data)
        return data


QUERY_FIELDS = ("text", "image", "audio", "embedding", "image_url")


def one_field_schema(schema: dict[str, Any]) -> None:
    """The JSON schema of a model that takes exactly one of its fields: one property (minProperties = maxProperties
    = 1), not null. The model itself also takes its other fields as null (counted as absent); a client never needs
    to send them, so the schema leaves that out and generated clients and test data send one field."""
    for prop in schema.get("properties", {}).values():
        prop.pop("default", None)
        branches = [s for s in prop.pop("anyOf", []) if s.get("type") != "null"]
        if len(branches) == 1:
            prop.update(branches[0])
        elif branches:
            prop["anyOf"] = branches
    schema["minProperties"] = schema["maxProperties"] = 1


class Query(BaseModel):
    """Exactly one of `text`, `image`, `audio`, `embedding` and `image_url`."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=one_field_schema)
    text: str | None = Field(None, description="a text query")
    image: str | None = Field(None, description="an image file, base64 or as a data URI (data:image/png;base64,...)")
    audio: str | None = Field(None, description="an audio file (WAV, FLAC, OGG, MP3), base64 or as a data URI")
    embedding: list[float] | None = Field(None, description="a query vector in the model's space")
    image_url: str | None = Field(
        None, max_length=4096, description="an image to fetch (http/https; only where XMODAL_FETCH_URLS=true)"
    )

    @field_validator("text")
    @classmethod
    def _text_not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("query.text must not be empty")
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> Query:
        given = [name for name in QUERY_FIELDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("query needs exactly one of `text`, `image`, `audio`, `embedding` or `image_url`")
        return self

    @property
    def modality(self) -> str | None:
        """The query's modality; None for a raw embedding (whose modality the service cannot know)."""
        if self.image_url is not None:
            return "image"
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
    heatmap: bool = Field(
        False,
        description="with explain: also each query token's similarity to every token of the row it matched in "
        "(`matches[].heat`: a patch grid for an image, frames for a sound, words for a text)",
    )

    @model_validator(mode="after")
    def _heatmap_explains(self) -> LateOptions:
        if self.heatmap:
            self.explain = True  # a heat map is an explanation: it comes with the matches it belongs to
        return self

    def params(self) -> LateParams:
        return LateParams(
            depth=self.depth, candidates=self.candidates, nprobe=self.nprobe, scope=self.scope, symmetric=self.symmetric
        )


class SearchRequest(RequestBody):
    index: str = Field(min_length=1, max_length=64)
    query: Query
    k: int = Field(10, ge=1, le=MAX_K, description=f"number of results (at most XMODAL_MAX_K, itself at most {MAX_K})")
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
    box: list[float] | None = Field(
        None,
        description="[left, top, right, bottom] as fractions of the item's picture: of the image as the model sees "
        "it (its centre crop: the page's thumbnail) for a patch, of the clip window (the page's waveform) for frames",
    )
    chars: list[int] | None = Field(None, description="[start, end) character offsets of a matched word in `text`")
    heat: list[float] | None = Field(
        None, description="late.heatmap: the query token's similarity to each token of that row, in token order"
    )
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
    media: list[str] | None = Field(
        None, description="the item's modalities that have a file to show (GET /v1/indexes/{index}/media)"
    )


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
    code: str = Field(description="stable machine-readable name, e.g. invalid_request, index_not_found")
    message: str
    details: dict[str, Any] = {}
    type: str = Field(description="OpenAI's error type: invalid_request_error, not_found_error, rate_limit_error, ...")
    param: str | None = Field(None, description="the request field at fault, when one is")


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok"]


class IndexSummary(BaseModel):
    name: str
    version: str
    items: int = Field(description="items in the served version")
    modalities: list[str]
    model: str = Field(description="the model the index was built with")
    faiss: str = Field(description="FAISS factory key")
    segments: int
    late: bool = Field(description="whether it has a token store (`mode: late`)")
    upgrading_from: str | None = Field(description="during a model upgrade: the old model")


class IndexList(BaseModel):
    indexes: list[IndexSummary]
    refused: dict[str, str] = Field(description="indexes published but not served, and why")


class IndexInfo(BaseModel):
    name: str
    version: str
    device: str = Field(description="where FAISS searches it: gpu, cpu or mixed (see placement)")
    placement: dict[str, dict[str, dict[str, Any]]] = Field(
        description="per segment and modality: the device and the reason (indexer.gpu.Placement)"
    )
    versions: list[str] = Field(description="the versions on disk")
    manifest: dict[str, Any] = Field(description="the served version's manifest")


class ModelStatus(BaseModel):
    name: str
    fingerprint: str
    dim: int
    providers: dict[str, list[str]] = Field(description="per tower: the providers its session really runs on")
    device: str = Field(description="cuda, cpu or mixed")


class IndexStatus(BaseModel):
    version: str
    items: int
    device: str = Field(description="where FAISS searches it: gpu, cpu, or mixed (see placement)")
    placement: dict[str, dict[str, dict[str, Any]]]
    model: str


class Devices(BaseModel):
    setting: str = Field(description="XMODAL_DEVICE")
    faiss_gpus: int = Field(description="the GPUs FAISS sees")
    onnxruntime_providers: list[str] = Field(description="the providers this ONNX Runtime offers")


class Readiness(BaseModel):
    ready: bool
    pid: int = Field(description="which worker answered (`xmodal serve --workers N`)")
    model: ModelStatus | None = Field(description="the default model, once loaded")
    models: list[ModelStatus]
    model_error: str | None
    model_errors: dict[str, str] = Field(description="configured bundles not loaded, and why")
    indexes: dict[str, IndexStatus]
    devices: Devices
    refused_indexes: dict[str, str]
    cache: dict[str, Any] = Field(description="the cache's backend and state")
