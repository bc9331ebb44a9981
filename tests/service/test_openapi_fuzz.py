"""Schemathesis over the service's own OpenAPI schema, against the real app under uvicorn (model and indexes
loaded, API keys and admin keys set): for every operation the schema lists, admin routes included, generated
requests, valid and invalid, must never get a 5xx, and every answer must be one the schema documents (status code,
content type, required headers, body schema).

Generation is steered towards what is served besides the random values: index names, item ids, real pictures and
sounds, vectors of the model's dimension, and now and then a lone surrogate, an empty string or an extreme number
in a body, so that requests also reach the search, encoding, media and job code, not only the validation in front
of it. Admin jobs are queued (202, a real status record) but not run: building indexes is test_jobs.py's business.

What JSON allows but a generator sends no way (NaN, Infinity, numbers past any float or past Python's digit limit,
nesting thousands deep) is swept over every JSON-body operation by ``test_odd_json_is_answered_as_documented``; and
a service that could not load its model must answer every operation as documented too (503 `not_ready`)."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.job_queue import LocalJobs, new_status
from service.job_store import JobStatus
from service.settings import Settings
from tests.conftest import ServerThread

ADMIN_KEY = "fuzz-admin-key"
SEARCH_KEY = "fuzz-search-key"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}  # an admin key passes the search-side key check too
CONFORMANCE = [
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
CHECKS = [not_a_server_error, *CONFORMANCE]
# Examples per operation in the fuzzing phase (the coverage phase adds its own): the file runs in about a minute on
# 2 cores. derandomize: the same requests in every run, so that CI is reproducible.
EXAMPLES = 100
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    # Real HTTP round trips are slow for Hypothesis, and steering draws large bodies (pictures, vectors).
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def fuzz_settings(**values: Any) -> Settings:
    # request_timeout_s: a 256-text /v1/embeddings on a loaded 2-core runner must not become a 503 (this file checks
    # answers against the schema, not latency; test_batching.py checks the deadline).
    return Settings(reload_interval_s=0, api_keys=SEARCH_KEY, admin_keys=ADMIN_KEY, request_timeout_s=60, **values)


# The schema the service serves with these settings (test_the_fuzzed_schema_is_the_served_one checks it is).
OPENAPI = create_app(fuzz_settings()).openapi()
schema = schemathesis.openapi.from_dict(OPENAPI)


class QueueOnly(LocalJobs):
    """Writes each job's status record as the service does, and runs nothing."""

    async def submit(self, name: str, request: dict, kind: str = "rebuild") -> JobStatus:
        status = new_status(name, request, kind)
        self.store.put(status)
        return status


def serve(settings_: Settings) -> Iterator[ServerThread]:
    with ServerThread(settings_) as server:
        app = server.server.config.app
        app.state.jobs = QueueOnly(app.state.xmodal.settings, on_done=lambda: None)
        yield server


# What the steering draws from, filled by the `server` fixture.
SERVED: dict[str, list] = {"names": [], "ids": [], "images": [], "sounds": [], "dim": []}


@pytest.fixture(scope="module")
def server(served_data: Path, late_data: Path, media_corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    """The demo text index and the tri-modal `media` index (token store, pictures, sounds), copied: nothing the
    fuzzer does reaches the shared fixtures."""
    data = tmp_path_factory.mktemp("fuzz-data")
    shutil.copytree(served_data / "indexes" / "demo", data / "indexes" / "demo")
    shutil.copytree(late_data / "indexes" / "media", data / "indexes" / "media")
    rows = [json.loads(line) for line in media_corpus.read_text().splitlines()]
    pictures, sounds = [r for r in rows if "image" in r][:3], [r for r in rows if "audio" in r][:3]
    media = media_corpus.parent
    SERVED["names"] = ["demo", "media"]
    SERVED["ids"] = ["doc-00001", *(r["id"] for r in pictures + sounds)]
    SERVED["images"] = [base64.b64encode((media / r["image"]).read_bytes()).decode() for r in pictures]
    SERVED["sounds"] = [base64.b64encode((media / r["audio"]).read_bytes()).decode() for r in sounds]
    for s in serve(fuzz_settings(data_dir=data, models_dir=served_data / "models")):
        SERVED["dim"] = [s.server.config.app.state.xmodal.registry.model(None).dim]
        yield s


# --- steering -----------------------------------------------------------------------------------------------------
# Hypothesis favours the first choices of sampled_from / one_of: the served values come first, the generated last.
ODD_STRINGS = ["\ud800", "\udfff", "", " ", "\x00", "\u2028", "data:image/png;base64,"]
ODD_NUMBERS = [0, -1, 2**63, -(2**63) - 1, 10**30, 1e308, -1e308, 5e-324]


def served(value: Any, key: str) -> st.SearchStrategy:
    return st.sampled_from([*SERVED[key], value])


def vectors() -> st.SearchStrategy:
    """Vectors of the model's dimension, of any float JSON carries (huge, tiny, zero)."""
    dim = SERVED["dim"][0]
    return st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=dim, max_size=dim)


def queries(generated: Any) -> st.SearchStrategy:
    """A query of each kind that can find something, or the generated one."""
    return st.one_of(
        st.text(min_size=1, max_size=300).map(lambda text: {"text": text}),
        st.sampled_from(SERVED["images"]).map(lambda image: {"image": image}),
        st.sampled_from(SERVED["sounds"]).map(lambda audio: {"audio": audio}),
        vectors().map(lambda vector: {"embedding": vector}),
        st.just(generated),
    )


def replaced(body: st.SearchStrategy, key: str, values: Callable[[Any], st.SearchStrategy]) -> st.SearchStrategy:
    """``body`` with ``key``'s value drawn from ``values(generated value)``, where the generated body has ``key``."""

    def draw(b: Any) -> st.SearchStrategy:
        if isinstance(b, dict) and key in b:
            return values(b[key]).map(lambda v: {**b, key: v})
        return st.just(b)

    return body.flatmap(draw)


def leaves(value: Any, path: tuple = ()) -> Iterator[tuple]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from leaves(item, (*path, i))
    elif isinstance(value, (str, int, float)):
        yield path


def put(value: Any, path: tuple, new: Any) -> Any:
    """A copy of ``value`` with ``new`` at ``path``."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: put(value[head], rest, new)}
    return [put(item, rest, new) if i == head else item for i, item in enumerate(value)]


def odd_leaf(body: Any) -> st.SearchStrategy:
    """``body`` as it is, or with one of its strings or numbers replaced by an odd one of the same kind."""
    paths = [p for p in leaves(body) if p]
    if not paths:
        return st.just(body)

    def odd(path: tuple) -> st.SearchStrategy:
        current: Any = body
        for part in path:
            current = current[part]
        pool = ODD_STRINGS if isinstance(current, str) else ODD_NUMBERS
        return st.sampled_from(pool).map(lambda new: put(body, path, new))

    return st.one_of(st.just(body), st.sampled_from(paths).flatmap(odd))


@schema.hook
def flatmap_path_parameters(ctx: schemathesis.HookContext, params: dict[str, Any]) -> st.SearchStrategy:
    return replaced(st.just(params), "name", lambda name: served(name, "names"))


@schema.hook
def flatmap_query(ctx: schemathesis.HookContext, query: dict[str, Any]) -> st.SearchStrategy:
    return replaced(st.just(query), "id", lambda item: served(item, "ids"))


@schema.hook
def flatmap_body(ctx: schemathesis.HookContext, body: Any) -> st.SearchStrategy:
    out = st.just(body)
    for key in ("index", "indice_name"):  # /v1/search, /v1/search/file; clip-retrieval's
        out = replaced(out, key, lambda name: served(name, "names"))
    out = replaced(out, "query", queries)
    out = replaced(out, "embedding_input", lambda v: st.one_of(vectors(), st.just(v)))
    pictures = [base64.b64decode(x) for x in SERVED["images"]]
    out = replaced(out, "file", lambda file: st.sampled_from([*pictures, file]))
    if ctx.operation is not None and ctx.operation.path == "/v1/search/file":
        return out  # a form: its fields are sent as text, whatever their value
    return out.flatmap(odd_leaf)


# --- the fuzz -----------------------------------------------------------------------------------------------------
@schema.parametrize()
@FUZZ
def test_api_conforms_to_its_schema(case: schemathesis.Case, server: ServerThread) -> None:
    case.call_and_validate(base_url=server.url, headers=AUTH, checks=CHECKS)


def test_the_fuzzed_schema_is_the_served_one(server: ServerThread) -> None:
    assert httpx.get(f"{server.url}/openapi.json").json() == OPENAPI


# --- what no generator sends: odd JSON, over every operation that takes a JSON body -------------------------------
BODIES = {  # a body each JSON operation accepts, whose every value the sweep replaces in turn
    ("POST", "/v1/search"): {
        "index": "media",
        "query": {"embedding": [0.5, 0.25]},
        "k": 3,
        "mode": "late",
        "late": {"depth": 3, "explain": True},
        "filter": {"kind": ["picture", 1]},
        "modalities": ["image"],
        "calibration": "zscore",
    },
    ("POST", "/v1/embeddings"): {"input": ["a", "b"], "dimensions": 384, "model": "xmodal-mini", "modality": "text"},
    ("POST", "/knn-service"): {"embedding_input": [0.5], "indice_name": "demo", "num_images": 2, "modality": "text"},
    ("POST", "/metadata"): {"ids": [1, 2], "indice_name": "demo"},
    ("POST", "/v1/indexes/{name}/rebuild"): {"corpus": "corpus.jsonl", "late": False},
    ("POST", "/v1/indexes/{name}/items"): {"items": [{"id": "a", "text": "b", "metadata": {"k": 1.5}}]},
    ("DELETE", "/v1/indexes/{name}/items"): {"ids": ["doc-00001"]},
    ("POST", "/v1/indexes/{name}/upgrade"): {"model": "xmodal-mini", "adapter": "mini-to-mini"},
}
ODD_JSON = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "9" * 5000, "[" * 5000 + "]" * 5000, '"\\ud800"']


def json_operations() -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, operations in OPENAPI["paths"].items()
        for method, operation in operations.items()
        if "application/json" in operation.get("requestBody", {}).get("content", {})
    }


def test_every_json_operation_is_swept() -> None:
    assert set(BODIES) == json_operations()


@pytest.mark.parametrize(("method", "path"), sorted(BODIES), ids=[f"{m} {p}" for m, p in sorted(BODIES)])
def test_odd_json_is_answered_as_documented(server: ServerThread, method: str, path: str) -> None:
    operation = schema[path][method]
    body = BODIES[(method, path)]
    url = server.url + path.replace("{name}", "demo")
    with httpx.Client(headers={**AUTH, "content-type": "application/json"}, timeout=60) as client:
        for leaf in [(), *leaves(body)]:
            for odd in ODD_JSON:
                raw = json.dumps(put(body, leaf, "__ODD__")).replace('"__ODD__"', odd)
                r = client.request(method, url, content=raw.encode())
                assert r.status_code < 500, f"{raw[:300]} -> {r.status_code} {r.text[:300]}"
                documented = OPENAPI["paths"][path][method.lower()]["responses"].get(str(r.status_code))
                assert documented is not None, f"{raw[:300]} -> undocumented {r.status_code} {r.text[:300]}"
                assert r.headers["content-type"].split(";")[0] in documented["content"], r.headers["content-type"]
                operation.validate_response(r)


# --- a service that could not load its model ----------------------------------------------------------------------
unready_schema = schemathesis.openapi.from_dict(
    OPENAPI, config=schemathesis.Config.from_dict({"phases": {"coverage": {"enabled": False}}})
)


def not_ready_or_4xx(ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Without its model, the service answers 503 `not_ready` (or /readyz's own body), never another 5xx."""
    if response.status_code < 500:
        return
    assert response.status_code == 503, response.text
    body = response.json()
    if case.path == "/readyz":
        assert body["ready"] is False and body["model_error"], body
    else:
        assert body["error"]["code"] == "not_ready", body


@pytest.fixture(scope="module")
def unready(tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("unready")  # no models/, no indexes/
    yield from serve(fuzz_settings(data_dir=data))


@unready_schema.parametrize()
@settings(FUZZ, max_examples=10)
def test_an_unready_service_answers_as_documented(case: schemathesis.Case, unready: ServerThread) -> None:
    case.call_and_validate(base_url=unready.url, headers=AUTH, checks=[not_ready_or_4xx, *CONFORMANCE])
