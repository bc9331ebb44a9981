"""Graceful stop on SIGTERM: requests in flight finish, new ones get 503, and the process exits within a deadline.

Uvicorn's own SIGTERM handling closes the listening socket at once (new clients get "connection refused", not an
answer) and waits without limit for the requests in flight. Here a SIGTERM first starts a drain: every new request
but ``/healthz`` (the process is alive; only readiness goes) is answered 503 ``shutting_down`` with
``Connection: close``, so that load balancers and clients move elsewhere, until no request is in flight or
XMODAL_DRAIN_S has passed; then uvicorn's shutdown runs as usual (``serving_options`` bounds the time it gives
requests still running, so the process exits shortly after the deadline). A second SIGTERM stops draining at once.

The handler is installed by the app's lifespan, only in a process's main thread, i.e. under ``xmodal serve`` (every
``--workers`` process; the supervisor passes SIGTERM on to them), never in tests that run the app in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response

log = logging.getLogger(__name__)
ALWAYS_OPEN = frozenset({"/healthz"})
GRACE_AFTER_DEADLINE_S = 1.0  # what uvicorn still gives requests running at the deadline before cancelling them


class Drain:
    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self.draining = False
        self.inflight = 0
        self._finishing: asyncio.Task | None = None

    def handle_sigterm(self) -> Callable[[], None]:
        """Route SIGTERM through the drain (then to the handler that was there: uvicorn's). Returns the undo."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None  # signals reach only the main thread: an app run in a thread has none to handle
        loop = asyncio.get_running_loop()
        previous = signal.getsignal(signal.SIGTERM)

        def stop(sig: int, frame: FrameType | None) -> None:
            if callable(previous):  # uvicorn's handler: its graceful shutdown
                previous(sig, frame)
            elif previous != signal.SIG_IGN:  # the default action, as without the drain: the process ends
                signal.signal(sig, signal.SIG_DFL)
                signal.raise_signal(sig)

        def on_sigterm(sig: int, frame: FrameType | None) -> None:
            if self.draining:  # a second SIGTERM: stop now
                stop(sig, frame)
                return
            self.draining = True
            loop.call_soon_threadsafe(self._start_finish, loop, lambda: stop(sig, frame))

        signal.signal(signal.SIGTERM, on_sigterm)
        return lambda: signal.signal(signal.SIGTERM, previous)

    def _start_finish(self, loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> None:
        self._finishing = loop.create_task(self.finish(stop))  # held: the loop keeps only weak references to tasks

    async def finish(self, stop: Callable[[], None]) -> None:
        """Wait until nothing is in flight or the deadline passed, then ``stop``."""
        t0 = time.monotonic()
        log.info(
            "SIGTERM: draining %d request(s) in flight (at most %.1f s); new requests get 503",
            self.inflight,
            self.deadline_s,
        )
        while self.inflight and time.monotonic() - t0 < self.deadline_s:
            await asyncio.sleep(0.05)
        if self.inflight:
            log.warning(
                "drain deadline (XMODAL_DRAIN_S=%s) passed with %d request(s) in flight", self.deadline_s, self.inflight
            )
        else:
            log.info("drained in %.2f s; shutting down", time.monotonic() - t0)
        stop()


def shutting_down(message: str) -> Response:
    return error_response(503, "shutting_down", message, headers={"connection": "close", "retry-after": "1"})


class DrainGate:
    """Counts the HTTP requests in flight; while draining, answers new ones 503."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app, self.drain = app, drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.drain.draining and scope["path"] not in ALWAYS_OPEN:
            refusal = shutting_down("the service is shutting down; retry (another replica will answer)")
            return await refusal(scope, receive, send)
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        self.drain.inflight += 1
        try:
            await self.app(scope, receive, watch)
        except asyncio.CancelledError:
            if not self.drain.draining:
                raise
            # Uvicorn cancels what still runs past the deadline: the request gets its answer (503, not a bare 500),
            # and this task, whose only work was that request, ends.
            if not started:
                message = f"the service stopped before this request finished (XMODAL_DRAIN_S={self.drain.deadline_s})"
                await error_response(503, "shutting_down", message, headers={"connection": "close"})(
                    scope, receive, send
                )
        finally:
            self.drain.inflight -= 1
