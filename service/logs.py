"""The service's log lines: text or JSON (XMODAL_LOG_FORMAT), each carrying the id of the request it was logged in.

The id lives in a context variable that service.middleware.RequestId sets for the request's task; threads that
Starlette runs work in (run_in_threadpool) copy the context, and so does the query encoder for its decoding
threads, so lines logged there carry it too; the micro-batcher's lanes serve every request and carry none. A
filter on the handler copies it into every record, whichever logger (ours, uvicorn's, a library's) wrote it.

An unexpected error's traceback is written once: service.errors logs it under the request's id, and uvicorn's own
"Exception in ASGI application" line for the same exception (Starlette re-raises it for the server) is dropped.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import sys
from contextvars import ContextVar
from typing import IO

request_id: ContextVar[str | None] = ContextVar("xmodal_request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"
OURS = ("models", "indexer", "service")
# What every LogRecord has; anything else on a record came from `extra=` and goes into the JSON line.
STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_id", "request_tag"}


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rid = request_id.get()
        record.request_id = rid
        record.request_tag = f" [{rid}]" if rid else ""
        return True


class TracebackOnce(logging.Filter):
    """Drops uvicorn's line for an exception whose traceback this handler has already written."""

    MARK = "_xmodal_traceback_logged"

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        if record.name == "uvicorn.error" and getattr(exc, self.MARK, False):
            return False
        with contextlib.suppress(AttributeError):  # an exception type with __slots__: then written twice
            setattr(exc, self.MARK, True)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, message, request_id (in a request), extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", None):
            line["request_id"] = record.request_id
        line.update({k: v for k, v in record.__dict__.items() if k not in STANDARD and not k.startswith("_")})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_logging(fmt: str, stream: IO[str] | None = None) -> logging.Handler:
    """The root logger's one handler (stderr by default): our INFO lines, libraries' warnings."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.addFilter(TracebackOnce())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in OURS:
        logging.getLogger(name).setLevel(logging.INFO)
    return handler


def uvicorn_log_config() -> dict:
    """uvicorn's loggers without handlers of their own: their lines go through the root handler, same format."""
    passthrough = {"level": "INFO", "handlers": [], "propagate": True}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "loggers": {name: passthrough for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }
