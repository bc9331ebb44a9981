"""The one mapping from typed errors to HTTP status codes, and the one JSON error shape:
``{"error": {"code": ..., "message": ..., "details": {...}}}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.errors import (
    BundleError,
    ExportError,
    InvalidInput,
    MissingDependency,
    NotFound,
    XmodalError,
)
from service.logs import request_id

log = logging.getLogger(__name__)


class Overloaded(XmodalError):
    """429 with Retry-After (whole seconds); with ``retry_after_ms``, also Retry-After-Ms, and Retry-After rounded
    from it (at least 1)."""

    code = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1, retry_after_ms: int | None = None, **details) -> None:
        if retry_after_ms is not None:
            retry_after_s = max(1, round(retry_after_ms / 1000))
            details["retry_after_ms"] = retry_after_ms
        super().__init__(message, retry_after_s=retry_after_s, **details)
        self.retry_after_s, self.retry_after_ms = retry_after_s, retry_after_ms


class DeadlineExceeded(Overloaded):
    """The request waited for the encoder past XMODAL_REQUEST_TIMEOUT_S: dropped unencoded (503, Retry-After)."""

    code = "deadline_exceeded"


class OverloadedWhileReading(StarletteHTTPException):
    """Overloaded, raised while the request's body is read (service.admission): FastAPI lets only HTTP exceptions
    through from there (others become a 400). Answered as Overloaded: 429, its details and Retry-After headers."""

    def __init__(self, message: str, details: dict, headers: dict[str, str]) -> None:
        super().__init__(429, message, headers=headers)
        self.details = details


class NotReady(XmodalError):
    code = "not_ready"


class ClientGone(XmodalError):
    """The client closed the connection before its answer: the work is dropped; the status is only logged."""

    code = "client_closed_request"


class InputTooLarge(XmodalError):
    """An input whose decoding would take more memory than the service lends all requests together."""

    code = "input_too_large"


class ResponseTooLarge(XmodalError):
    """The answer would be larger than the service sends in one response."""

    code = "response_too_large"


class Unauthorized(XmodalError):
    """No key sent where one is needed (401, WWW-Authenticate: Bearer)."""

    code = "unauthorized"


class Forbidden(XmodalError):
    """A key was sent that this route does not accept: not a configured key, or a search key on an admin route."""

    code = "forbidden"


class AdminDisabled(XmodalError):
    """Admin routes called while no admin key is configured."""

    code = "admin_disabled"


# Most specific first: the first class the error is an instance of decides the status.
STATUS: list[tuple[type[XmodalError], int]] = [
    (DeadlineExceeded, 503),
    (Overloaded, 429),
    (ResponseTooLarge, 413),
    (InputTooLarge, 413),
    (ClientGone, 499),  # nginx's code for it: no client reads it
    (Unauthorized, 401),
    (Forbidden, 403),
    (AdminDisabled, 403),
    (NotReady, 503),
    (NotFound, 404),
    (InvalidInput, 400),
    (BundleError, 503),
    (MissingDependency, 503),
    (ExportError, 500),
    (XmodalError, 500),
]


HTTP_CODES = {
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    429: "overloaded",
}


def status_for(exc: XmodalError) -> int:
    return next(code for cls, code in STATUS if isinstance(exc, cls))


REQUEST_PARTS = ("body", "query", "path", "header", "cookie")  # where FastAPI's error locations start
# OpenAI's error `type` for a status, so that OpenAI clients raise the right exception with the message.
OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


def error_response(
    status: int, code: str, message: str, details: dict | None = None, headers: dict | None = None
) -> JSONResponse:
    """The one error shape: ``code``, ``message``, ``details``, plus OpenAI's ``type`` and ``param``."""
    details = details or {}
    kind = OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {
        "error": {"code": code, "message": message, "details": details, "type": kind, "param": details.get("param")}
    }
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str, list]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return "malformed_json", "the request body is not valid JSON", []
    parts = []
    for e in errors:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    clean = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors]
    return "invalid_request", "; ".join(parts), clean


def xmodal_response(exc: XmodalError) -> JSONResponse:
    """A typed error's answer: its status, its body, its headers (Retry-After, WWW-Authenticate). Also what the pure
    ASGI gates in front of the routes send (service.auth), which the exception handlers do not see."""
    status = status_for(exc)
    if status >= 500:
        log.error("%s: %s", exc.code, exc.message)
    headers = None
    if isinstance(exc, Overloaded):
        headers = {"Retry-After": str(exc.retry_after_s)}
        if exc.retry_after_ms is not None:
            headers["Retry-After-Ms"] = str(exc.retry_after_ms)
    elif isinstance(exc, Unauthorized):
        headers = {"WWW-Authenticate": "Bearer"}
    return error_response(status, exc.code, exc.message, exc.details, headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(XmodalError)
    async def _xmodal(_req: Request, exc: XmodalError) -> JSONResponse:
        return xmodal_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(req: Request, exc: RequestValidationError) -> JSONResponse:
        if any(tuple(e.get("loc", ())) == ("body",) for e in exc.errors()):  # the body as a whole is wrong
            ctype = req.headers.get("content-type", "")
            if "json" not in ctype:
                message = f"send the body as JSON with `Content-Type: application/json` (got {ctype or 'none'!r})"
                return error_response(415, "unsupported_media_type", message)
        code, message, errors = _validation_message(exc)
        details = {"errors": errors}
        if errors:  # the first field at fault, as OpenAI names it: "dimensions", "query.text"
            loc = errors[0]["loc"]
            details["param"] = ".".join(map(str, loc[1:] if loc and loc[0] in REQUEST_PARTS else loc)) or None
        return error_response(400 if code == "malformed_json" else 422, code, message, details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, "http_error")
        details = getattr(exc, "details", None)
        return error_response(exc.status_code, code, str(exc.detail), details, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        # The server closes the connection after an unhandled error: say so, so keep-alive clients reconnect. This
        # handler runs outside the middleware (Starlette's ServerErrorMiddleware): it adds the request id itself.
        headers = {"connection": "close", "x-request-id": request_id.get() or ""}
        return error_response(500, "internal_error", f"internal error ({type(exc).__name__})", headers=headers)
