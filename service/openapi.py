"""What the OpenAPI schema says beyond what each route declares: the answers of the layers around the routes, and the
limits this service was configured with. Checked against the running service by tests/service/test_openapi_fuzz.py
(schemathesis): every status, body and header the service sends must be one its schema documents."""

from __future__ import annotations

from fastapi import FastAPI

from service.drain import ALWAYS_OPEN
from service.settings import Settings

ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
RETRY_AFTER = {"description": "seconds to wait before retrying", "schema": {"type": "integer", "minimum": 0}}
WWW_AUTHENTICATE = {"description": "`Bearer`: the scheme a key is sent with", "schema": {"type": "string"}}


def error(description: str) -> dict:
    return {"description": description, "content": ERROR}


def document_service(app: FastAPI, settings: Settings) -> None:
    """Adds to each operation of the schema what the app's own layers may answer besides its route, keeping what the
    route says where it says it:

    - 503 `shutting_down` (service.drain): every path but ``/healthz``, while the service drains after a SIGTERM;
    - 413 `payload_too_large` (service.middleware.BodyLimit): every operation that takes a body;
    - 422 `invalid_request` (FastAPI's validation, in the error shape of service.errors): every operation that takes
      parameters or a body;
    - `Retry-After` on every 429, `WWW-Authenticate` on every 401: they are always sent;
    - `k`'s maximum is this service's XMODAL_MAX_K, not the absolute bound its models carry (MAX_K): above it is a
      422, as below 1 is."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for path, operations in schema.get("paths", {}).items():
                for operation in operations.values():
                    document_operation(path, operation)
            limit_k(schema, settings.max_k)
        return app.openapi_schema

    app.openapi = openapi


def document_operation(path: str, operation: dict) -> None:
    responses = operation.setdefault("responses", {})
    if path not in ALWAYS_OPEN:
        responses.setdefault("503", error("the service is not ready, or is shutting down (`shutting_down`)"))
    if "requestBody" in operation:
        responses.setdefault("413", error("the request body is over XMODAL_MAX_BODY_BYTES"))
    if "requestBody" in operation or operation.get("parameters"):
        responses.setdefault("422", error("a parameter or the body is not what the schema says"))
    for status, header, value in (("429", "Retry-After", RETRY_AFTER), ("401", "WWW-Authenticate", WWW_AUTHENTICATE)):
        if status in responses:
            responses[status].setdefault("headers", {}).setdefault(header, {**value, "required": True})


def limit_k(schema: dict, max_k: int) -> None:
    schemas = schema["components"]["schemas"]
    form = schema["paths"]["/v1/search/file"]["post"]["requestBody"]["content"]["multipart/form-data"]
    for name in ("SearchRequest", form["schema"]["$ref"].rsplit("/", 1)[-1]):
        schemas[name]["properties"]["k"]["maximum"] = max_k
