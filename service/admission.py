"""Admission control (issue 14): which searches start now and which are refused at once with 429, so that the ones
admitted finish in bounded time however much load arrives, and refusing the rest costs next to nothing.

Why not a fixed limit: what one process sustains depends on the machine, the model and the mix of requests. A limit
high enough for bursts (``XMODAL_MAX_INFLIGHT``, 64) lets a standing queue of seconds build under sustained overload
(64 in flight is about 8x what 2 cores sustain: p99 1-2 s); a low one wastes capacity, or sheds bursts that would
have drained at once.

How (Little's law for the limit, CoDel's idea of a standing queue to tell overload from a burst):

- Work: a request in flight counts the queries it has sent to the encoder (``charge``, from service.batcher), at
  least 1: a search is 1, an embeddings request of 100 texts is 100, a cache hit 1. So one heavy request does not
  pass for a slow service, nor a light one for a fast service.
- Throughput X: work finished per second of busy time (time with at least one request in flight), sampled every
  ``WINDOW_S`` and smoothed. It is what the service sustains now, on this machine, for this mix of requests; it
  falls when the encoder is slow or stuck (nothing finishes while requests are in flight).
- A new request's expected wait: W = work in flight / X (what is ahead of it, at the rate it leaves).
- While W is under the target (``XMODAL_QUEUE_TARGET_MS``, 100 ms), or above it for less than ``STANDING_S`` (a
  burst that drains), requests are let in while the work in flight is under what drains in ``BURST`` x the target
  (X x 150 ms at the default), or under one full encoder batch (``XMODAL_BATCH_MAX``, 32) when that is more: a
  burst gets in whole, and even its last request waits little longer than that. (A throughput measured at low
  concurrency underestimates what batching does with a burst: the batch keeps an idle service from refusing one.)
- Once W, averaged over ``STANDING_S`` (the work in flight dips each time a batch finishes), is above the target
  (a standing queue: sustained overload, or a stuck encoder), the bound becomes X x target: admitted requests wait
  about the target, the others get 429 at once. This lasts until no request has been refused for ``QUIET_S`` and
  the last interval's W was under the target (the load fits again).
- Whatever the bound, ``XMODAL_MIN_INFLIGHT`` requests in flight are never refused for their wait (heavy requests,
  a slow or stuck encoder still get work), and never more than ``XMODAL_MAX_INFLIGHT`` are in flight (the hard
  ceiling). Before any throughput is measured the bound is one encoder batch (a fresh replica that overload meets
  at once queues no more than that); with ``XMODAL_QUEUE_TARGET_MS=0`` the ceiling is the limit (a fixed limit, as
  before issue 14).

Where: :class:`FrontDoor` and :class:`AdmissionGate`, in front of the routes that encode (``GATED``). When the
service is at its limit as a request arrives, the front door answers 429 before anything else of the app runs: no
middleware, no body read (no JSON, base64 or multipart parsing for it), no access log line (a count every
``SUMMARY_S``). Otherwise the gate, a pure ASGI middleware inside the key check, gives the request its place in
flight once its body has been received (so a client slow to send its body holds no place) and keeps it until its
answer is sent. Routes still call :meth:`Admission.admit`: a no-op for a request the gate admitted, the check
itself for one that came another way.

Retry-After spreads retries: each refusal draws a delay uniformly in ``RETRY_MS`` (1-3 s), sent as
``Retry-After-Ms`` (what OpenAI's client reads first) and, rounded to whole seconds as HTTP wants, as
``Retry-After`` (1, 2 or 3): clients refused together do not come back together.

Everything runs on the event loop (no lock); ``clock`` is injectable for tests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import Overloaded, OverloadedWhileReading
from service.settings import Settings

log = logging.getLogger(__name__)

WINDOW_S = 0.25  # throughput sampling period
SMOOTHING = 0.4  # weight of the newest window's throughput
STANDING_S = 0.1  # the expected wait above the target this long: a standing queue, not a burst (CoDel: 100 ms)
BURST = 1.5  # a burst is let in up to what drains in BURST x the target (150 ms at the default)
QUIET_S = 1.0  # no refusal for this long (and no standing queue): bursts are let in again
SUMMARY_S = 10.0  # while refusing, one log line this often (not one per refusal)
RETRY_MS = (1000, 3001)  # the delay a refused client is asked to wait, drawn uniformly (ms)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# The routes that encode queries (search, embeddings, clip-retrieval's knn): their POSTs pass the gate.
GATED = frozenset({"/v1/search", "/v1/search/file", "/v1/embeddings", "/knn-service"})


@dataclass
class Ticket:
    """One request's place in flight, taken by the gate once its body is in (or by ``admit``)."""

    admission: Admission | None = None
    started: float | None = None  # clock() when admitted; None: not (yet) admitted
    queries: int = 0  # queries it has sent to the encoder (charge)

    @property
    def work(self) -> int:
        """What it counts for: its queries, at least 1 (a request not encoding yet, or answered from a cache)."""
        return max(1, self.queries)


_ticket: ContextVar[Ticket | None] = ContextVar("xmodal_admission_ticket", default=None)


def charge(queries: int) -> None:
    """The request being served sends ``queries`` queries to the encoder (service.batcher calls this): they count
    in the work in flight, and once the request is done, in the throughput."""
    ticket = _ticket.get()
    if ticket is not None and ticket.started is not None and ticket.admission is not None:
        admission, before = ticket.admission, ticket.work
        admission._tick(admission.clock())  # the work so far counted at its old value
        ticket.queries += queries
        admission.work += ticket.work - before


class Admission:
    def __init__(
        self,
        max_inflight: int,
        registry: CollectorRegistry,
        queue_target_s: float = 0.1,
        min_inflight: int = 8,
        burst_min: int = 32,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.max_inflight = max_inflight
        self.queue_target_s = queue_target_s  # 0: a fixed limit
        self.min_inflight = min(min_inflight, max_inflight)
        self.burst_min = burst_min  # a burst of this much work is always let in (outside a standing queue)
        self.clock, self.rng = clock, rng or random.Random()
        self.inflight = 0  # requests
        self.work = 0  # their work (Ticket.work summed)
        self.throughput: float | None = None  # X: work finished per busy second; None until measured
        self.shedding = False  # a standing queue was seen: the bound is X x target
        now = clock()
        self._window_start, self._done, self._busy, self._busy_since = now, 0, 0.0, now
        self._interval_start, self._area, self._area_at = now, 0.0, now  # work x time over this STANDING_S
        self._standing = False  # the last interval's W was above the target
        self._last_shed = -math.inf
        self._summary_at, self._shed_since_summary = now, 0
        self._gauge = Gauge("xmodal_search_inflight", "searches in progress", registry=registry)
        gauges = {
            "xmodal_admission_limit": ("the work (queries) admitted requests may hold now", lambda: self.bound),
            "xmodal_admission_work": ("the work (queries) of the requests in flight", lambda: self.work),
            "xmodal_admission_throughput": ("work finished per busy second (smoothed)", lambda: self.throughput or 0),
            "xmodal_admission_shedding": ("1 while the bound is throughput x the target", lambda: self.shedding),
        }
        for name, (doc, value) in gauges.items():
            Gauge(name, doc, registry=registry).set_function(lambda value=value: float(value()))
        shed = Counter("xmodal_admission_shed", "requests refused (429) by admission", ["stage"], registry=registry)
        self._shed = {stage: shed.labels(stage) for stage in ("arrival", "body", "route")}
        self._seconds = Histogram(
            "xmodal_admission_seconds", "admitted requests' time in flight", registry=registry, buckets=LATENCY_BUCKETS
        )

    @classmethod
    def from_settings(cls, settings: Settings, registry: CollectorRegistry) -> Admission:
        """From XMODAL_MAX_INFLIGHT, XMODAL_QUEUE_TARGET_MS and XMODAL_MIN_INFLIGHT; a burst of one full encoder
        batch (XMODAL_BATCH_MAX) is always let in."""
        return cls(
            settings.max_inflight,
            registry,
            queue_target_s=settings.queue_target_ms / 1000,
            min_inflight=settings.min_inflight,
            burst_min=settings.batch_max,
        )

    # --- the bound ------------------------------------------------------------------------------------------------
    @property
    def adaptive(self) -> bool:
        return self.queue_target_s > 0

    @property
    def bound(self) -> int:
        """The work admitted requests may hold now (XMODAL_MAX_INFLIGHT when not adaptive; one encoder batch until
        throughput is measured)."""
        self._tick(self.clock())
        return self._bound()

    def _bound(self) -> int:
        if not self.adaptive:
            return self.max_inflight
        if self.throughput is None:  # a fresh replica hit by overload: one batch's worth until it has measured
            return min(self.max_inflight, max(self.burst_min, self.min_inflight))
        return self._drains_in(1) if self.shedding else max(self.burst_min, self._drains_in(BURST))

    def _drains_in(self, targets: float) -> int:
        """The work that drains in ``targets`` x the target at the throughput measured (at least 1)."""
        return max(1, int((self.throughput or 0.0) * self.queue_target_s * targets))

    def _full(self) -> bool:
        if self.inflight >= self.max_inflight:
            return True
        return self.inflight >= self.min_inflight and self.work >= self._bound()

    def _tick(self, now: float) -> None:
        """Roll the throughput window when it is over; follow W; stop refusing once quiet."""
        elapsed = now - self._window_start
        if elapsed >= WINDOW_S:
            busy = self._busy + (now - self._busy_since if self.inflight else 0.0)
            # A window with work finished, or busy most of it with none finished (a stuck encoder: X falls); an
            # idle one says nothing about throughput.
            if busy > 0 and (self._done or busy >= elapsed / 2):
                sample = self._done / busy
                x = self.throughput
                self.throughput = sample if x is None else SMOOTHING * sample + (1 - SMOOTHING) * x
            self._window_start, self._done, self._busy, self._busy_since = now, 0, 0.0, now
        if self._shed_since_summary and now - self._summary_at >= SUMMARY_S:
            log.warning(
                "admission: %d requests refused (429) in the last %.0f s (%d in flight, %.0f queries/s)",
                self._shed_since_summary,
                now - self._summary_at,
                self.inflight,
                self.throughput or 0.0,
            )
            self._summary_at, self._shed_since_summary = now, 0
        if not self.adaptive or self.throughput is None:  # a fixed limit: throughput is only shown
            return
        # W over the last STANDING_S: the work in flight averaged over time (not as it is now: it dips each time a
        # batch finishes), over throughput. Above the target a whole interval: a standing queue.
        self._area += self.work * (now - self._area_at)
        self._area_at = now
        if now - self._interval_start >= STANDING_S:
            average = self._area / (now - self._interval_start)
            self._standing = self.inflight > self.min_inflight and average > self.throughput * self.queue_target_s
            self._interval_start, self._area = now, 0.0
            if self._standing and not self.shedding:
                self.shedding, self._last_shed = True, now
                log.warning(
                    "admission: a standing queue (%.0f queries in flight on average; %.0f queries/s): admitting "
                    "what drains in %g ms",
                    average,
                    self.throughput,
                    self.queue_target_s * 1000,
                )
        if self.shedding and not self._standing and now - self._last_shed >= QUIET_S:
            self.shedding = False
            log.info("admission: no request refused for %g s: bursts are let in again", QUIET_S)

    # --- admitting ------------------------------------------------------------------------------------------------
    def full(self) -> bool:
        """Whether a request arriving now would be refused."""
        self._tick(self.clock())
        return self._full()

    def try_acquire(self, ticket: Ticket) -> bool:
        """Take a place in flight for ``ticket``; False: refuse the request."""
        now = self.clock()
        self._tick(now)
        if self._full():
            return False
        if not self.inflight:
            self._busy_since = now
        self.inflight += 1
        self.work += ticket.work
        ticket.admission, ticket.started = self, now
        self._gauge.inc()
        return True

    def release(self, ticket: Ticket) -> None:
        now = self.clock()
        self._tick(now)
        self.inflight -= 1
        self.work -= ticket.work
        self._gauge.dec()
        self._done += ticket.work
        if not self.inflight:
            self._busy += now - self._busy_since
        self._seconds.observe(now - (ticket.started or now))
        ticket.admission = None  # later charges (none expected) count nowhere

    def refusal(self, stage: str) -> tuple[str, dict, dict[str, str]]:
        """Count a refusal: (message, details, headers) of its 429, with a retry delay drawn to spread retries."""
        self._shed[stage].inc()
        self._last_shed = self.clock()
        self._shed_since_summary += 1
        ms = self.rng.randrange(*RETRY_MS)
        message = f"the service is at its limit ({self.inflight} requests in flight); retry in {ms / 1000:.1f} s"
        details = {"in_flight": self.inflight, "retry_after_s": whole_seconds(ms), "retry_after_ms": ms}
        return message, details, {"retry-after": str(whole_seconds(ms)), "retry-after-ms": str(ms)}

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold a place in flight while the block runs, or raise Overloaded (429). A no-op for a request the gate
        admitted (its place is held until its answer is sent)."""
        held = _ticket.get()
        if held is not None and held.started is not None:
            yield
            return
        ticket = Ticket()
        if not self.try_acquire(ticket):
            message, details, _headers = self.refusal("route")
            raise Overloaded(message, **details)
        token = _ticket.set(ticket)
        try:
            yield
        finally:
            _ticket.reset(token)
            self.release(ticket)


def whole_seconds(ms: int) -> int:
    """A delay in ms as Retry-After's whole seconds: rounded (1-3 s spreads over 1, 2, 3), at least 1."""
    return max(1, round(ms / 1000))


class AdmissionGate:
    """The place in flight of an admitted ``GATED`` POST (see the module's docstring), from the body's last byte to
    the answer's. Refusals on arrival happen before this, in :class:`FrontDoor`; this gate refuses (through the error
    handlers) only a request whose body came while the limit was reached."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in GATED or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        admission: Admission | None = getattr(scope["app"].state, "admission", None)
        if admission is None:  # still starting: the routes answer 503
            return await self.app(scope, receive, send)
        ticket = Ticket()
        _ticket.set(ticket)  # the request's own context (a task of its own): seen by admit() and charge()

        async def admitted() -> Message:
            message = await receive()
            body_in = ticket.started is None and message["type"] == "http.request" and not message.get("more_body")
            if body_in and not admission.try_acquire(ticket):  # the limit was reached while the body came
                raise OverloadedWhileReading(*admission.refusal("body"))  # the error handlers answer it
            return message

        try:
            await self.app(scope, admitted, send)
        finally:
            if ticket.started is not None:
                admission.release(ticket)


class FrontDoor:
    """Refusals on arrival, answered before anything else of the app runs (the app calls :meth:`refused` first
    thing, outside FastAPI's own middleware): a ``GATED`` POST that arrives while the service is at its limit gets its
    429 here, its body never read. Under 8x overload most requests are refused, and their cost comes out of the CPU
    the admitted ones need: through the whole middleware stack a refusal cost about 180 us of CPU, here about 100 us
    (of which uvicorn's own share is 50-90 us). Not refused here, so that the layers inside answer them as before:
    a request while the service drains (503), and one without a valid key when keys are set (401/403).

    ``count(path)`` counts the refusal in the request counts by route (what CountRequests does for the others); each
    answer carries an ``X-Request-ID`` (a per-process prefix and a counter: no uuid per refusal)."""

    def __init__(self, admission: Admission, count: Callable[[str], None], let_through: Callable[[Scope], bool]):
        self.admission, self.count, self.let_through = admission, count, let_through
        self._prefix, self._n = f"{random.getrandbits(32):08x}-shed-", 0

    async def refused(self, scope: Scope, send: Send) -> bool:
        """Whether the request was refused (and answered) here."""
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GATED:
            return False
        if not self.admission.full() or self.let_through(scope):
            return False
        message, details, headers = self.admission.refusal("arrival")
        error = {"code": "overloaded", "message": message, "details": details, "type": "rate_limit_error"}
        body = json.dumps({"error": {**error, "param": None}}).encode()
        self._n += 1
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw += [(k.encode(), v.encode()) for k, v in headers.items()]
        raw.append((b"x-request-id", f"{self._prefix}{self._n:x}".encode()))
        await send({"type": "http.response.start", "status": 429, "headers": raw})
        await send({"type": "http.response.body", "body": body})
        self.count(scope["path"])
        return True
