"""Memory lent to a use, shared by all requests. Two budgets use it:

- decoding (``XMODAL_DECODE_MEMORY_MB``): an input reserves what its header says decoding will take before any
  pixel or sample is decoded, keeps what its decoded form takes until it is encoded, then gives it back;
- request bodies (``XMODAL_BODY_MEMORY_MB``, service.middleware.BodyBudget): a request with a large body reserves
  a few times its length (the bytes, the JSON text, the base64-decoded file) before its body is read, until its
  answer is sent.

A reservation over the whole budget is refused (413); one that must wait waits at most ``decode_wait_s``, first
come first served, then gets 429 with Retry-After. So that memory stays under the budget however many requests
arrive at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client import CollectorRegistry, Gauge

from service.errors import InputTooLarge, Overloaded

MB = 1 << 20
T = TypeVar("T")


@dataclass
class Waiter:
    size: int
    future: asyncio.Future


class Reservation:
    def __init__(self, budget: MemoryBudget, size: int) -> None:
        self.budget, self.size = budget, size
        self.handed_over = False

    async def hold_while(self, work: asyncio.Future[T]) -> T:
        """``work``'s result (a worker thread's future). Cancelled meanwhile, the thread still holds the memory:
        the reservation is given back when the thread is done, not before."""
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            self.hand_over()
            work.add_done_callback(lambda _f: self.release())
            raise

    def hand_over(self) -> None:
        """Someone else releases it now (a worker thread's end, the batcher): leaving ``reserve`` keeps it."""
        self.handed_over = True

    def shrink(self, size: int) -> None:
        """Keep only ``size`` bytes (the decoded form, once decoding's peak has passed)."""
        size = max(0, min(size, self.size))
        self.budget.give_back(self.size - size)
        self.size = size

    def release(self) -> None:
        self.shrink(0)


@dataclass(frozen=True)
class Use:
    """What a budget lends memory to: its gauge, its setting and the words of its errors."""

    gauge: str
    setting: str
    doing: str  # "decoding this image would take ..."
    lent_to: str  # "... the MB the service lends decoding"


DECODING = Use("xmodal_decode_memory_bytes", "XMODAL_DECODE_MEMORY_MB", "decoding", "decoding")
BODIES = Use("xmodal_body_memory_bytes", "XMODAL_BODY_MEMORY_MB", "reading", "request bodies")


class MemoryBudget:
    """Bytes reserved on the event loop (no lock needed); the work itself (decoding) may run in worker threads."""

    def __init__(
        self, capacity: int, wait_s: float, registry: CollectorRegistry | None = None, use: Use = DECODING
    ) -> None:
        self.capacity, self.wait_s, self.use = capacity, wait_s, use
        self.used = 0
        self.waiters: deque[Waiter] = deque()
        self.gauge = Gauge(use.gauge, f"memory reserved for {use.lent_to}", registry=registry)

    @contextlib.asynccontextmanager
    async def reserve(self, size: int, what: str) -> AsyncIterator[Reservation]:
        if size > self.capacity:
            use = self.use
            raise InputTooLarge(
                f"{use.doing} {what} would take about {size / MB:,.0f} MB, over the {self.capacity / MB:,.0f} MB the "
                f"service lends {use.lent_to} ({use.setting}): send a smaller file",
                needed_bytes=size,
                budget_bytes=self.capacity,
            )
        await self._acquire(size, what)
        reservation = Reservation(self, size)
        try:
            yield reservation
        finally:
            if not reservation.handed_over:
                reservation.release()

    async def _acquire(self, size: int, what: str) -> None:
        if not self.waiters and self.used + size <= self.capacity:
            self._take(size)
            return
        waiter = Waiter(size, asyncio.get_running_loop().create_future())
        self.waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter.future, self.wait_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if waiter.future.done() and not waiter.future.cancelled():
                self.give_back(size)  # granted just as we gave up
            else:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)
                self._wake()  # a large waiter leaving may let smaller ones behind it in
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise Overloaded(
                f"the memory lent to {self.use.lent_to} is busy: {what} needs about {size / MB:,.0f} MB and waited "
                f"{self.wait_s:g} s; retry"
            ) from None

    def _take(self, size: int) -> None:
        self.used += size
        self.gauge.set(self.used)

    def give_back(self, size: int) -> None:
        if size:
            self.used -= size
            self.gauge.set(self.used)
            self._wake()

    def _wake(self) -> None:
        while self.waiters and self.used + self.waiters[0].size <= self.capacity:
            waiter = self.waiters.popleft()
            if not waiter.future.done():
                self._take(waiter.size)
                waiter.future.set_result(None)
