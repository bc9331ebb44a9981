"""Admission control: how many searches may be under way at once; beyond that a request is shed with 429 at once
rather than queued for longer than anyone waits."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Gauge

from service.errors import Overloaded


class Admission:
    def __init__(self, max_inflight: int, registry: CollectorRegistry) -> None:
        self.max_inflight = max_inflight
        self.inflight = 0
        self._gauge = Gauge("xmodal_search_inflight", "searches in progress", registry=registry)

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Bound concurrent searches: beyond ``max_inflight`` a request gets 429 rather than a long queue."""
        if self.inflight >= self.max_inflight:
            raise Overloaded(f"more than {self.max_inflight} searches in progress; retry shortly")
        self.inflight += 1
        self._gauge.inc()
        try:
            yield
        finally:
            self.inflight -= 1
            self._gauge.dec()
