"""Searches: the query dispatch (text, image, audio or a given vector; dense or late), the result cache and the
search metrics. Each index is searched with the model it was built with (service.registry)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import TypeVar

from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool

from indexer.search import Hit, LateRequest, LoadedIndex
from models.encoder import Encoder
from models.errors import InvalidInput
from service.cache import Cache, result_key
from service.errors import ResponseTooLarge
from service.explain import describe
from service.media import media_of
from service.metrics import Metrics
from service.payloads import decode_base64
from service.query_encoder import QueryEncoder
from service.registry import Registry
from service.schemas import LateOptions, Query, Result, SearchRequest, SearchResponse, TokenMatch
from service.settings import Settings

T = TypeVar("T")
RESULTS = TypeAdapter(list[Result])  # a cached answer's results, read and written as JSON bytes
LARGE_K = 100  # answers of more results, or with explanations, are serialised off the event loop
LARGE_BYTES = 1 << 16  # cached answers longer than this are read off the event loop
# What one match of an explained late result counts towards XMODAL_MAX_RESPONSE_FLOATS besides its heat map: about
# what it takes in the answer (its numbers: query and item token, similarity, a box of 4 or 2 character offsets, and
# its text), in floats.
MATCH_VALUES = 8


class SearchService:
    def __init__(self, registry: Registry, cache: Cache, metrics: Metrics, settings: Settings) -> None:
        self.registry = registry
        self.cache = cache
        self.metrics = metrics
        self.settings = settings

    def index_for(self, req: SearchRequest) -> LoadedIndex:
        """The served index of ``req``, once ``req`` is known to be one it can answer (before any encoding)."""
        index = self.registry.index(req.index)
        if req.mode == "late":
            index.require_tokens()
            if req.query.embedding is not None:
                raise InvalidInput(
                    "`mode: late` needs a text, image or audio query: a raw embedding has no token vectors",
                    param="query.embedding",
                )
        return index

    async def search(self, req: SearchRequest, index: LoadedIndex, deadline: float, t0: float) -> SearchResponse:
        """``req`` answered on ``index`` (from ``index_for``); ``deadline`` and ``t0`` are the request's."""
        queries = self.registry.queries_for(index)
        key = await off_loop_if(carries_file(req.query), request_key, index, req)
        with self._stage("result_cache", index, req):
            raw = await self.cache.get(key)
        cached = raw is not None
        self.metrics.cache.labels("result", "hit" if cached else "miss").inc()
        if cached:
            results = await off_loop_if(len(raw) > LARGE_BYTES, RESULTS.validate_json, raw)
        else:
            if req.mode == "late":
                results = await self._late(req, index, queries, deadline)
            else:
                results = await self._dense(req, index, queries, deadline)
            payload = await off_loop_if(large_answer(req), partial(RESULTS.dump_json, exclude_none=True), results)
            await self.cache.set(key, payload, self.settings.result_ttl_s)
        took = round((time.perf_counter() - t0) * 1000, 3)
        self.metrics.search_seconds.labels(str(cached).lower()).observe(took / 1000)
        return SearchResponse(
            results=results,
            index=index.name,
            index_version=index.version,
            model=queries.name,
            mode=req.mode,
            calibration=applied_calibration(req, index),
            cached=cached,
            took_ms=took,
        )

    async def _dense(
        self, req: SearchRequest, index: LoadedIndex, queries: QueryEncoder, deadline: float
    ) -> list[Result]:
        q = req.query
        if q.embedding is not None:
            vec = queries.given_vector(q.embedding)
        else:
            vec = await queries.vector(*await off_loop_if(carries_file(q), query_input, q), deadline, index.name)
        args = (vec, req.k, req.modalities, req.filter, q.modality, req.calibration)
        with self._stage("search", index, req):
            hits, media = await run_in_threadpool(hits_and_media, index, index.search, *args)
        return [result(h, media=media.get(h.id)) for h in hits]

    async def _late(
        self, req: SearchRequest, index: LoadedIndex, queries: QueryEncoder, deadline: float
    ) -> list[Result]:
        """Late interaction: the query's token vectors, MaxSim over the token store, explained on request."""
        q = req.query
        options = req.late or LateOptions()
        out = await queries.tokens(*await off_loop_if(carries_file(q), query_input, q), deadline, index.name)
        if options.explain:  # before the search: the most this request can get
            results, query_tokens = min(req.k, index.size), len(out.tokens[0])
            most = results * query_tokens
            what = f"up to {results} results x {query_tokens} query tokens"
            self._check_explained_size(options, most, most if options.heatmap else 0, what)
        late = LateRequest(
            out.tokens[0], out.embedding[0], options.params(), explain=options.explain, heatmap=options.heatmap
        )
        args = (late, req.k, req.modalities, req.filter, q.modality, req.calibration)
        with self._stage("late_rerank", index, req):
            hits, media = await run_in_threadpool(hits_and_media, index, index.search_late, *args)
        if not options.explain:
            return [result(h, media=media.get(h.id)) for h in hits]
        found = sum(len(h.matches or []) for h in hits)  # the real ones, before anything is rendered
        self._check_explained_size(options, found, heat_values(hits), f"{found} matches in {len(hits)} results")
        pooled = (index.manifest.tokens or {}).get("pool_factor", 1) > 1
        matches = await run_in_threadpool(explained, hits, queries.encoder, q.text, pooled)  # tokenizes: off the loop
        return [result(h, m, media.get(h.id)) for h, m in zip(hits, matches, strict=True)]

    def _check_explained_size(self, options: LateOptions, matches: int, heat: int, what: str) -> None:
        """413 when a late answer's explanations would hold more than XMODAL_MAX_RESPONSE_FLOATS values: each match
        counts MATCH_VALUES, each heat map value one. Checked before the search on the most the request can get (one
        match per query token of each of min(k, items) results, and with a heat map at least one value each), then
        after it, before anything is rendered, on the real matches and heat maps."""
        values = matches * MATCH_VALUES + heat
        limit = self.settings.max_response_floats
        if values > limit:
            lower = (
                "leave out `late.heatmap`, or lower `k`"
                if options.heatmap
                else "lower `k`, or leave out `late.explain`"
            )
            raise ResponseTooLarge(
                f"the answer would hold {values:,} values ({what}; {MATCH_VALUES} per match"
                f"{', plus each heat map value' if options.heatmap else ''}), over the limit of {limit:,} "
                f"(XMODAL_MAX_RESPONSE_FLOATS); {lower}",
                param="late.heatmap" if options.heatmap else "k",
                limit=limit,
                values=values,
            )

    @contextlib.contextmanager
    def _stage(self, stage: str, index: LoadedIndex, req: SearchRequest) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.metrics.stage(stage, index.name, req.query.modality or "embedding", time.perf_counter() - t0)


def carries_file(q: Query) -> bool:
    return q.image is not None or q.audio is not None


async def off_loop_if(heavy: bool, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)``, in a worker thread when ``heavy`` (a query carrying a file of up to XMODAL_MAX_BODY_BYTES: its
    base64 decoding and hashing; a large answer), else at once: for a search of 10 results a thread hop costs more
    than the call, and two more hops a search halved the cache hits one process answers (bench/service.py)."""
    return await run_in_threadpool(fn, *args) if heavy else fn(*args)


def large_answer(req: SearchRequest) -> bool:
    """Whether the answer to ``req`` may be large enough to serialise off the event loop: more than LARGE_K results,
    or late search explanations (heat maps: query tokens x item tokens a result)."""
    return req.k > LARGE_K or (req.mode == "late" and req.late is not None and req.late.explain)


def request_key(index: LoadedIndex, req: SearchRequest) -> str:
    return result_key(index.name, index.version, req.model_dump(mode="json"))


def heat_values(hits: list[Hit]) -> int:
    return sum(len(m.heat) for h in hits for m in h.matches or [] if m.heat is not None)


def query_input(q: Query) -> tuple[str, str | bytes]:
    """A text, image or audio query as (modality, the text or the file's bytes); a base64 error names its field."""
    if q.text is not None:
        return "text", q.text
    modality = "image" if q.image is not None else "audio"
    return modality, decode_base64(getattr(q, modality), f"query.{modality}")


def applied_calibration(req: SearchRequest, index: LoadedIndex) -> str | None:
    """The calibration that mixes the request's target modalities (None when there is one list to rank)."""
    targets = sorted(set(req.modalities or index.modalities))
    if len(targets) < 2 or (req.mode == "late" and req.late is not None and req.late.scope == "all"):
        return None
    return index.fusion(req.calibration, req.query.modality, targets, req.mode).method


def hits_and_media(index: LoadedIndex, search: Callable[..., list[Hit]], *args: object) -> tuple[list[Hit], dict]:
    """A search and which of its items have media to show, in one trip to the thread pool."""
    hits = search(*args)
    return hits, media_of(index, [h.id for h in hits])


def explained(hits: list[Hit], encoder: Encoder, query_text: str | None, pooled: bool) -> list[list[TokenMatch]]:
    return [describe(h, encoder, query_text, pooled) for h in hits]


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
