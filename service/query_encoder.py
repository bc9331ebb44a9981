"""One loaded model's query side: validation, the embedding cache, decoding within the memory budget, and its
micro-batcher. Takes data (texts, files' bytes, vectors), never closures; searches and /v1/embeddings both come
through here, so both get the same limits, cache keys and batches."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable, Coroutine, Sequence

import numpy as np
from starlette.concurrency import run_in_threadpool

from models.encoder import Encoder, TokenOutput
from models.errors import InvalidInput
from service.batcher import MicroBatcher
from service.budget import MemoryBudget
from service.cache import Cache, embedding_key
from service.metrics import NO_INDEX, Metrics
from service.settings import Settings

LARGE_INPUT_BYTES = 1 << 16  # files larger than this (all of a request's together) are hashed off the event loop


class QueryEncoder:
    def __init__(
        self,
        encoder: Encoder,
        settings: Settings,
        cache: Cache,
        budget: MemoryBudget,
        metrics: Metrics,
        inflight: Callable[[], int],
    ) -> None:
        self.encoder = encoder
        self.settings = settings
        self.cache = cache
        self.budget = budget
        self.metrics = metrics
        self.batcher = MicroBatcher(encoder, settings, metrics.batch, inflight)

    @property
    def name(self) -> str:
        return self.encoder.name

    @property
    def fingerprint(self) -> str:
        return self.encoder.fingerprint

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def close(self) -> None:
        self.batcher.close()

    def check_text(self, text: str, field: str = "query.text") -> None:
        """A text to encode: not blank, at most XMODAL_MAX_TEXT_CHARS characters."""
        if not text.strip():
            raise InvalidInput(f"{field} must not be empty", param=field)
        if len(text) > self.settings.max_text_chars:
            raise InvalidInput(
                f"{field} is {len(text)} characters; the limit is {self.settings.max_text_chars}", param=field
            )

    def check_texts(self, texts: Sequence[str], field: str = "input") -> None:
        """``check_text`` for each, named ``field[i]``: callers refuse a request with it before any other work."""
        for i, text in enumerate(texts):
            self.check_text(text, f"{field}[{i}]")

    async def vector(self, modality: str, item: str | bytes, deadline: float, index: str = NO_INDEX) -> np.ndarray:
        """One query's vector: a text, or an image / audio file's bytes. ``index``: the served index it is for (the
        stage metrics' label)."""
        if isinstance(item, str):
            self.check_text(item)
        return (await self.encode(modality, [item], deadline, index=index))[0]

    async def tokens(self, modality: str, item: str | bytes, deadline: float, index: str = NO_INDEX) -> TokenOutput:
        """One query's pooled vector and token vectors, for late interaction."""
        if isinstance(item, str):
            self.check_text(item)
        return (await self.encode(modality, [item], deadline, tokens=True, index=index))[0]

    def given_vector(self, values: list[float]) -> np.ndarray:
        """A query vector sent as such: the model's dimension, finite, non-zero; unit length returned."""
        with np.errstate(over="ignore", invalid="ignore"):  # 1e308 values become inf in float32: refused below
            vec = np.asarray(values, dtype=np.float32)
            norm = float(np.linalg.norm(vec))
        if vec.shape != (self.dim,):
            raise InvalidInput(f"query.embedding has {vec.size} values; model {self.name} has {self.dim}")
        if not np.isfinite(norm) or norm == 0.0:
            raise InvalidInput("query.embedding must be finite and non-zero")
        return vec / norm  # cosine similarity: unit query

    async def encode(
        self,
        modality: str,
        inputs: Sequence[str | bytes],
        deadline: float,
        tokens: bool = False,
        index: str = NO_INDEX,
    ) -> list:
        """Texts, or image / audio files' bytes → each one's vector ([dim] float32) or, with ``tokens``, its
        TokenOutput (one row). Through the embedding cache; the misses are decoded (within the decoding memory
        budget, off the event loop) and join micro-batches with other requests' queries. ``deadline``
        (time.monotonic()) is the request's: counted from its arrival, not from here. ``index`` labels the
        stage metrics: the served index these are queries of, NO_INDEX for none. Texts are checked by the caller
        (``check_texts``), before the request's other work."""
        kind = f"{modality}+tokens" if tokens else modality
        keys = await self._keys(kind, inputs)
        found: list = []
        t0 = time.perf_counter()
        for key in keys:  # one at a time: a 256-text request must not open 256 Redis connections
            found.append(self._from_cache(await self.cache.get(key), tokens))
        self.metrics.stage("embedding_cache", index, modality, time.perf_counter() - t0)
        misses = [i for i, v in enumerate(found) if v is None]
        self.metrics.cache.labels("embedding", "hit").inc(len(inputs) - len(misses))
        if not misses:
            return found
        self.metrics.cache.labels("embedding", "miss").inc(len(misses))
        if modality == "text":
            fresh = await self.batcher.encode("text", tokens, [inputs[i] for i in misses], deadline, index=index)
        else:
            fresh = await all_of([self._decoded_encode(modality, inputs[i], tokens, deadline, index) for i in misses])
        for i, value in zip(misses, fresh, strict=True):
            if tokens and len(value.tokens[0]) == 0:
                raise InvalidInput(f"the {modality} query has no tokens to match")
            found[i] = value
            await self.cache.set(keys[i], self._to_cache(value, tokens), self.settings.embedding_ttl_s)
        return found

    async def _decoded_encode(
        self, modality: str, data: bytes, tokens: bool, deadline: float, index: str
    ) -> np.ndarray | TokenOutput:
        """Decode one file within the memory budget (reserved from its header), then encode it in a batch; its
        decoded form's memory is held until it is encoded. The decoding thread runs in a copy of the request's
        context: its log lines carry the request's id."""
        cost = await run_in_threadpool(self.encoder.decode_cost, modality, data)
        loop = asyncio.get_running_loop()
        async with self.budget.reserve(max(cost.peak, cost.kept), f"this {modality}") as reservation:
            t0 = time.perf_counter()
            in_context = contextvars.copy_context().run
            decoding = loop.run_in_executor(None, in_context, self.encoder.decode, modality, data)
            decoded = await reservation.hold_while(decoding)
            self.metrics.stage("decode", index, modality, time.perf_counter() - t0)
            reservation.shrink(cost.kept)
            reservation.hand_over()  # the batcher gives it back once no queue or batch holds the decoded file
            found = await self.batcher.encode(modality, tokens, [decoded], deadline, reservation.release, index)
            return found[0]

    async def _keys(self, kind: str, inputs: Sequence[str | bytes]) -> list[str]:
        """The inputs' embedding cache keys: sha256 of their bytes, hashed off the event loop when the files are
        large (10 MB take about 6 ms here)."""

        def keys() -> list[str]:
            return [embedding_key(self.fingerprint, kind, x.encode() if isinstance(x, str) else x) for x in inputs]

        large = sum(len(x) for x in inputs if isinstance(x, bytes)) > LARGE_INPUT_BYTES
        return await run_in_threadpool(keys) if large else keys()

    def _from_cache(self, raw: bytes | None, tokens: bool) -> np.ndarray | TokenOutput | None:
        """A cached vector, or for tokens float32 [1 + n, D]: the pooled vector, then the tokens."""
        row = self.dim * 4
        if raw is None:
            return None
        if not tokens:
            return np.frombuffer(raw, dtype=np.float32) if len(raw) == row else None
        if len(raw) <= row or len(raw) % row:
            return None
        both = np.frombuffer(raw, dtype=np.float32).reshape(-1, row // 4)
        return TokenOutput(both[:1], [both[1:]])

    @staticmethod
    def _to_cache(value: np.ndarray | TokenOutput, tokens: bool) -> bytes:
        if not tokens:
            return value.astype(np.float32).tobytes()
        return np.concatenate([value.embedding[:1], value.tokens[0]]).astype(np.float32).tobytes()


async def all_of(coros: list[Coroutine]) -> list:
    """Run concurrently and give the results in order; the first error cancels the others and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
