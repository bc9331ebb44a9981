"""Micro-batching of query encodes: concurrent queries for one tower share one ONNX run.

One lane per (tower, with tokens): a bounded queue (a full one is a 429), and one worker task that takes the
queries waiting, waits at most ``batch_wait_ms`` after the first for more, and stops at ``batch_max`` queries or the
lane's cost bound (padded tokens for text, decoded pixels for images); it does not wait when every request under way
is already in the batch. Queries whose client has gone (their future cancelled) or whose deadline passed are dropped
before encoding. The batch runs in a worker thread, never on the event loop. A batch that raises is encoded again one
query at a time, so an input the encoder refuses fails alone and the others get their vectors; the worker keeps
running whatever a batch does.

Inputs arrive decoded (images, audio), so a file that cannot be decoded has failed before it joins a batch. Results
equal encoding alone: texts are padded to the batch's longest with an attention mask, media are fixed-size tensors.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool

from models.encoder import Encoder, TokenOutput
from service.admission import charge
from service.errors import DeadlineExceeded, NotReady, Overloaded
from service.logs import request_id
from service.metrics import NO_INDEX, BatchMetrics
from service.settings import Settings

log = logging.getLogger(__name__)

TOKENIZE_INLINE_CHARS = 2048  # longer inputs are tokenised (for their cost) off the event loop


@dataclass(eq=False)  # compared by identity: its item may be an array or a picture
class Query:
    item: Any  # a text, a decoded image or waveform
    cost: int  # tokens of a text, pixels of an image
    deadline: float  # time.monotonic()
    future: asyncio.Future
    on_leave: Callable[[], None] | None = None  # called once the lane holds it no more (dropped or encoded)
    index: str = NO_INDEX  # for the stage metrics: the served index it is for
    request: str | None = None  # the id of the request it came from (the lane's own lines carry none)
    queued: float = field(default_factory=time.monotonic)

    def leave(self) -> None:
        self.item = None  # the queue and the batch hold it no more: a decoded file is freed with its last holder
        if self.on_leave is not None:
            self.on_leave()
            self.on_leave = None


@dataclass(frozen=True)
class LaneKey:
    modality: str
    tokens: bool

    @property
    def label(self) -> str:
        return f"{self.modality}+tokens" if self.tokens else self.modality


class Lane:
    """One tower's queue and its worker task. The task starts in an empty context: it serves every request, so it
    carries none's id (the request that happened to create it would otherwise tag the lane's lines forever)."""

    def __init__(self, batcher: MicroBatcher, key: LaneKey) -> None:
        self.batcher, self.key, self.label = batcher, key, key.label
        self.series = (batcher.model, key.label)  # the batch metrics' labels: model and lane
        metrics = batcher.metrics  # this lane's series, looked up once (not per query)
        self.rejected, self.failed = metrics.rejected.labels(*self.series), metrics.failed.labels(*self.series)
        self.queue_seconds = metrics.queue_seconds.labels(*self.series)
        self.batch_size = metrics.batch_size.labels(*self.series)
        self.encode_seconds = metrics.encode_seconds.labels(*self.series)
        settings = batcher.settings
        self.max_items = settings.batch_max
        self.max_cost = {"text": settings.batch_max_tokens, "image": settings.batch_max_pixels}.get(key.modality)
        self.padded = key.modality == "text"  # a text batch costs items x its longest
        self.queue: deque[Query] = deque()
        self.wakeup = asyncio.Event()
        name = f"xmodal-batch-{batcher.model}-{self.label}"
        self.task = asyncio.get_running_loop().create_task(self.run(), name=name, context=contextvars.Context())

    def submit(
        self,
        items: Sequence[Any],
        costs: Sequence[int],
        deadline: float,
        on_leave: Callable[[], None] | None,
        index: str = NO_INDEX,
    ) -> list[asyncio.Future]:
        """All of ``items`` join the queue, or none does (Overloaded)."""
        limit = self.batcher.settings.batch_queue
        if len(self.queue) + len(items) > limit:
            self.rejected.inc(len(items))
            raise Overloaded(f"the {self.label} encoder has {len(self.queue)} queries waiting (limit {limit})")
        loop = asyncio.get_running_loop()
        futures = []
        rid = request_id.get()
        for item, cost in zip(items, costs, strict=True):
            query = Query(item, cost, deadline, loop.create_future(), on_leave, index, rid)
            self.queue.append(query)
            futures.append(query.future)
        self.wakeup.set()
        return futures

    async def run(self) -> None:
        log.debug("micro-batch lane %s of model %s started", self.label, self.batcher.model)
        while True:
            try:
                batch = await self.next_batch()
                if batch:
                    await self.encode(batch)
                del batch  # not kept while the next batch forms: its decoded files' memory is lent again
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the lane die: its queue would fill and stay full
                log.exception("micro-batch worker %s", self.label)

    def _live(self, query: Query, now: float) -> bool:
        """False for a query to drop: its deadline passed, or its request stopped waiting (the client has gone)."""
        expired = now > query.deadline
        if not query.future.done() and not expired:
            return True
        self.batcher.metrics.dropped.labels(*self.series, "deadline" if expired else "cancelled").inc()
        if not query.future.done():
            query.future.set_exception(DeadlineExceeded("the query waited for the encoder past its deadline"))
        return False

    async def next_batch(self) -> list[Query]:
        while not self.queue:
            self.wakeup.clear()
            await self.wakeup.wait()
        batch: list[Query] = []
        longest = total = 0
        close = None
        while len(batch) < self.max_items:
            if not self.queue:
                if close is None or not self.batcher.more_coming(len(batch)):
                    break
                remaining = close - time.monotonic()
                if remaining <= 0:
                    break
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), remaining)
                except TimeoutError:
                    break
                continue
            query = self.queue[0]
            if not self._live(query, time.monotonic()):
                self.queue.popleft().leave()
                continue
            cost = max(longest, query.cost) * (len(batch) + 1) if self.padded else total + query.cost
            if batch and self.max_cost is not None and cost > self.max_cost:
                break  # the next batch starts with it
            self.queue.popleft()
            batch.append(query)
            longest, total = max(longest, query.cost), total + query.cost
            if close is None:  # the first query's wait bounds the batch's
                close = query.queued + self.batcher.settings.batch_wait_ms / 1000
        now = time.monotonic()
        live = [q for q in batch if self._live(q, now)]  # again: some may have gone while the batch filled
        for query in batch:
            if query not in live:
                query.leave()
        return live

    async def encode(self, batch: list[Query]) -> None:
        now = time.monotonic()
        metrics, modality = self.batcher.metrics, self.key.modality
        for query in batch:
            self.queue_seconds.observe(now - query.queued)
            metrics.stages.labels("queue", query.index, modality).observe(now - query.queued)
        self.batch_size.observe(len(batch))
        loop = asyncio.get_running_loop()
        items = [q.item for q in batch]
        pool = self.batcher.executor
        t0 = time.perf_counter()
        try:
            try:
                results: list[Any] = await loop.run_in_executor(pool, self.batcher.encode_batch, self.key, items)
            except Exception as exc:  # noqa: BLE001 - whichever input made it raise fails alone, below
                self.failed.inc()
                log.warning(
                    "a %s batch of %d queries raised (%s: %s); encoding them one by one",
                    self.label,
                    len(batch),
                    type(exc).__name__,
                    exc,
                    extra={"request_ids": sorted({q.request for q in batch if q.request})},
                )
                results = await loop.run_in_executor(pool, self.batcher.encode_each, self.key, items)
            took = time.perf_counter() - t0
            self.encode_seconds.observe(took)
            for query in batch:
                metrics.stages.labels("encode", query.index, modality).observe(took)
            for query, result in zip(batch, results, strict=True):
                if query.future.done():
                    continue
                if isinstance(result, BaseException):
                    query.future.set_exception(result)
                else:
                    query.future.set_result(result)
        finally:  # whatever happened above, no request waits for a batch that is over
            items.clear()  # before leave() lends their memory again
            for query in batch:
                query.leave()
                if not query.future.done():
                    query.future.set_exception(NotReady(f"the {self.label} encoder stopped"))

    def close(self) -> None:
        self.task.cancel()
        while self.queue:
            query = self.queue.popleft()
            query.leave()
            if not query.future.done():
                query.future.set_exception(NotReady("the service is shutting down"))


class MicroBatcher:
    """The lanes of one encoder. ``encode`` awaits the results of a request's inputs, encoded with other requests'."""

    def __init__(
        self,
        encoder: Encoder,
        settings: Settings,
        metrics: BatchMetrics,
        in_flight: Callable[[], int] | None = None,
    ) -> None:
        self.encoder, self.settings, self.metrics = encoder, settings, metrics
        self.model = f"{encoder.name}@{encoder.fingerprint[:12]}"  # its batch metrics' label: two models stay apart
        self.in_flight = in_flight  # requests under way; None: unknown, always worth waiting for
        self.lanes: dict[LaneKey, Lane] = {}
        # One batch at a time per lane: a thread each for text, image, audio, with and without tokens.
        self.executor = ThreadPoolExecutor(max_workers=6, thread_name_prefix="xmodal-encode")

    async def encode(
        self,
        modality: str,
        tokens: bool,
        items: Sequence[Any],
        deadline: float,
        on_leave: Callable[[], None] | None = None,
        index: str = NO_INDEX,
    ) -> list[Any]:
        """Each item's vector ([dim] float32) or, with ``tokens``, its TokenOutput of one row; in order.
        ``on_leave`` is called for each item once no queue or batch holds it (at once if it was refused); ``index``
        labels the items' queue and encode stages (service.metrics)."""
        key = LaneKey(modality, tokens)
        lane = self.lanes.get(key) or self.lanes.setdefault(key, Lane(self, key))
        try:
            costs = await self.costs(modality, items)
            futures = lane.submit(items, costs, deadline, on_leave, index)
            charge(len(items))  # the request's work, for admission
        except BaseException:
            for _ in items:
                if on_leave is not None:
                    on_leave()
            raise
        gathered = asyncio.gather(*futures)
        try:
            done = await asyncio.wait_for(gathered, max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            raise DeadlineExceeded(
                f"no answer from the {key.label} encoder within XMODAL_REQUEST_TIMEOUT_S "
                f"({self.settings.request_timeout_s:g} s)"
            ) from None
        finally:
            for future in futures:
                future.cancel()  # a client gone (this task cancelled): its queries leave the queue unencoded
            if gathered.done() and not gathered.cancelled():
                gathered.exception()  # an error that came as the wait ended: seen, not "never retrieved"
        return list(done)

    def more_coming(self, batched: int) -> bool:
        """Whether a batch of ``batched`` queries may still get company: not when every request under way is
        already in it (one client alone waits for nobody)."""
        return self.in_flight is None or self.in_flight() > batched

    async def costs(self, modality: str, items: Sequence[Any]) -> list[int]:
        """What each item weighs against the lane's bound: tokens of a text, pixels of a decoded image."""
        if modality == "text":
            texts = list(items)
            if sum(map(len, texts)) <= TOKENIZE_INLINE_CHARS:  # a query or two: quicker than a thread hop
                return self.encoder.count_tokens(texts)
            return await run_in_threadpool(self.encoder.count_tokens, texts)
        if modality == "image":
            return [im.width * im.height for im in items]
        return [0] * len(items)

    # --- in the worker thread --------------------------------------------------------------------------------------
    def encode_batch(self, key: LaneKey, items: list[Any]) -> list[Any]:
        """One ONNX run over ``items`` (the encoder's own batching, told the whole batch is one)."""
        n = len(items)
        enc, modality = self.encoder, key.modality
        if modality == "text":
            out = enc.encode_text_tokens(items, n) if key.tokens else enc.encode_text(items, n)
        else:
            out = enc.encode_media_tokens(modality, items, n) if key.tokens else enc.encode_media(modality, items, n)
        if not key.tokens:
            return list(out)
        return [TokenOutput(out.embedding[i : i + 1], [out.tokens[i]]) for i in range(n)]

    def encode_each(self, key: LaneKey, items: list[Any]) -> list[Any]:
        """After a batch raised: each item alone, its own result or its own error."""
        results: list[Any] = []
        for item in items:
            try:
                results.extend(self.encode_batch(key, [item]))
            except Exception as exc:  # noqa: BLE001 - handed to that item's request
                results.append(exc)
        return results

    def close(self) -> None:
        for lane in self.lanes.values():
            lane.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
