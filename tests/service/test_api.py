"""The real app (lifespan, model, index, cache) through HTTP requests in-process."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from indexer.build import build_index
from indexer.corpus import read_jsonl
from models.bundle import DEFAULT_MODEL
from models.mini.prepare import TEXT_MODEL
from service.app import create_app
from service.settings import Settings


def make_client(data: Path, **settings) -> TestClient:
    return TestClient(create_app(Settings(data_dir=data, reload_interval_s=0, **settings)))


@pytest.fixture(scope="module")
def client(served_data: Path):
    with make_client(served_data) as c:
        yield c


def search(client: TestClient, **body):
    return client.post("/v1/search", json={"index": "demo", **body})


def test_search_returns_ranked_results_with_metadata(client: TestClient) -> None:
    r = search(client, query={"text": "the goalkeeper saves a penalty"}, k=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == DEFAULT_MODEL and body["mode"] == "dense" and body["cached"] is False
    assert body["index"] == "demo" and body["index_version"]
    assert body["took_ms"] > 0
    results = body["results"]
    assert len(results) == 5
    assert [x["metadata"]["topic"] for x in results] == ["football"] * 5
    scores = [x["score"] for x in results]
    assert scores == sorted(scores, reverse=True) and -1 <= scores[-1] <= scores[0] <= 1
    assert all(x["id"].startswith("doc-") and x["modality"] == "text" and x["text"] for x in results)


def test_second_identical_request_is_cached(client: TestClient) -> None:
    body = {"query": {"text": "rain over the harbour at night"}, "k": 4}
    first, second = search(client, **body).json(), search(client, **body).json()
    assert first["cached"] is False and second["cached"] is True
    assert first["results"] == second["results"]
    assert first["index_version"] == second["index_version"]
    assert search(client, **{**body, "k": 5}).json()["cached"] is False  # another request, another key


def test_embedding_query_equals_text_query(client: TestClient) -> None:
    vec = client.post("/v1/embeddings", json={"input": "a chef bakes a cake"}).json()["data"][0]["embedding"]
    by_vec = search(client, query={"embedding": [2 * v for v in vec]}, k=5).json()["results"]  # scale is ignored
    by_text = search(client, query={"text": "a chef bakes a cake"}, k=5).json()["results"]
    assert [x["id"] for x in by_vec] == [x["id"] for x in by_text]


def test_filter(client: TestClient) -> None:
    r = search(client, query={"text": "a chef bakes a cake"}, k=3, filter={"topic": "space"}).json()
    assert [x["metadata"]["topic"] for x in r["results"]] == ["space"] * 3


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"query": {"text": ""}}, 422, "invalid_request"),
        ({"query": {"text": "   "}}, 422, "invalid_request"),
        ({"query": {}}, 422, "invalid_request"),
        ({"query": {"text": "a", "embedding": [1.0]}}, 422, "invalid_request"),
        ({"query": {"text": "a"}, "k": 0}, 422, "invalid_request"),
        ({"query": {"text": "a"}, "k": -3}, 422, "invalid_request"),
        ({"query": {"text": "a"}, "k": 1001}, 422, "invalid_request"),  # over XMODAL_MAX_K, as k < 1 is
        ({"query": {"text": "a"}, "k": 10_001}, 422, "invalid_request"),  # over the schema's own bound
        ({"query": {"text": "a"}, "k": "ten"}, 422, "invalid_request"),
        ({"query": {"text": "a"}, "mode": "sparse"}, 422, "invalid_request"),
        ({"query": {"text": "a"}, "mode": "late"}, 400, "invalid_input"),
        ({"query": {"text": "a"}, "modalities": ["image"]}, 400, "invalid_input"),
        ({"query": {"text": "a"}, "modalities": ["smell"]}, 422, "invalid_request"),
        ({"query": {"embedding": [0.1, 0.2]}}, 400, "invalid_input"),
        ({"query": {"embedding": [0.0] * 384}}, 400, "invalid_input"),
        ({"query": {"text": "x" * 5000}}, 400, "invalid_input"),
        ({"query": {"text": "a"}, "unexpected": 1}, 422, "invalid_request"),
        ({"query": {"image": "not base64!"}}, 400, "invalid_input"),
        ({"query": {"image": "data:image/png,plain"}}, 400, "invalid_input"),
        ({"query": {"image": "aGVsbG8="}}, 400, "invalid_input"),  # valid base64, but this model has no image tower
        ({"query": {"text": "a", "image": "aGVsbG8="}}, 422, "invalid_request"),
        ({"index": "nope", "query": {"text": "a"}}, 404, "index_not_found"),
        ({"index": "", "query": {"text": "a"}}, 422, "invalid_request"),
    ],
)
def test_bad_input_gets_a_clear_4xx(client: TestClient, body: dict, status: int, code: str) -> None:
    r = client.post("/v1/search", json={"index": "demo", **body})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"]


@pytest.mark.parametrize(
    "raw",
    [
        '{"index": "demo", "query": {"text": "\\ud800"}}',  # a lone surrogate escape: valid JSON, not Unicode
        '{"index": "demo", "query": {"text": "a"}, "filter": {"k": "\\udfff"}}',
        '{"index": "demo", "query": {"text": "a"}, "filter": {"\\ud800": 1}}',
        '{"index": "demo", "query": {"image": "\\ud800"}}',
        '{"index": "demo", "query": {"text": "a"}, "filter": {"k": ' + "[" * 300 + "]" * 300 + "}}",
        '{"index": "demo", "query": {"text": "a"}, "filter": {"k": ' + "[" * 5000 + "]" * 5000 + "}}",
    ],
)
def test_json_that_no_request_means_is_a_4xx_not_a_500(client: TestClient, raw: str) -> None:
    r = client.post("/v1/search", content=raw.encode(), headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), r.text
    assert r.json()["error"]["message"]
    r = client.post("/v1/embeddings", json={"input": "ok"})  # and the service is fine afterwards
    assert r.status_code == 200
    bad = client.post(
        "/v1/embeddings", content=b'{"input": ["ok", "\\ud800"]}', headers={"content-type": "application/json"}
    )
    assert bad.status_code == 422 and "input[1]" in bad.json()["error"]["message"]


def test_the_schema_says_k_is_1_to_this_services_max_k(client: TestClient) -> None:
    """Above XMODAL_MAX_K is a 422 as below 1 is, on the JSON search and the upload alike; the schema says so (it
    said 10,000, the absolute bound, and nothing at all for the upload's form field)."""
    schema = create_app(Settings(max_k=50)).openapi()
    form = schema["paths"]["/v1/search/file"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    for ref in (form["$ref"], "#/components/schemas/SearchRequest"):
        k = schema["components"]["schemas"][ref.rsplit("/", 1)[-1]]["properties"]["k"]
        assert (k["minimum"], k["maximum"]) == (1, 50)
    for k in (0, 1001):  # this client's service: the default XMODAL_MAX_K, 1000
        r = client.post("/v1/search/file", files={"file": ("q.png", b"\x89PNG")}, data={"index": "demo", "k": str(k)})
        assert r.status_code == 422 and r.json()["error"]["param"] == "k", r.text


def test_non_finite_embedding_is_rejected(client: TestClient) -> None:
    raw = '{"index": "demo", "query": {"embedding": [' + ",".join(["1e400"] * 384) + "]}}"
    r = client.post("/v1/search", content=raw, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422) and "error" in r.json()


def test_malformed_json_is_400(client: TestClient) -> None:
    r = client.post("/v1/search", content=b'{"index": "demo",', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "malformed_json"


def test_oversized_body_is_413_declared_or_streamed(client: TestClient) -> None:
    big = json.dumps({"index": "demo", "query": {"text": "a" * (11 << 20)}}).encode()
    r = client.post("/v1/search", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    r = client.post("/v1/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_unknown_route_and_method_use_the_error_shape(client: TestClient) -> None:
    assert client.get("/v2/nothing").json()["error"]["code"] == "not_found"
    r = client.get("/v1/search")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_indexes_health_ready_metrics(client: TestClient) -> None:
    listing = client.get("/v1/indexes").json()["indexes"]
    assert [(i["name"], i["items"], i["modalities"], i["late"]) for i in listing] == [("demo", 800, ["text"], False)]
    info = client.get("/v1/indexes/demo").json()
    assert info["manifest"]["counts"] == {"text": 800} and info["version"] in info["versions"]
    assert client.get("/v1/indexes/absent").status_code == 404
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["model"]["providers"] == {m: ["CPUExecutionProvider"] for m in ("text", "image", "audio")}
    assert ready.json()["cache"]["backend"] == "memory"
    assert ready.json()["indexes"]["demo"]["device"] == "cpu"  # no GPU here: FAISS stays on the CPU
    (placement,) = ready.json()["indexes"]["demo"]["placement"].values()  # one segment, by modality
    assert placement["text"]["device"] == "cpu" and "FAISS sees no GPU" in placement["text"]["reason"]
    assert ready.json()["model"]["device"] == "cpu"
    devices = ready.json()["devices"]
    assert devices["setting"] == "auto" and devices["faiss_gpus"] == 0
    assert "CPUExecutionProvider" in devices["onnxruntime_providers"]
    assert info["placement"] == ready.json()["indexes"]["demo"]["placement"]
    search(client, query={"text": "metrics please"})
    metrics = client.get("/metrics").text
    assert 'xmodal_search_seconds_count{cached="false"}' in metrics
    for stage in ("result_cache", "embedding_cache", "queue", "encode", "search"):  # by index and query modality
        assert f'xmodal_search_stage_seconds_count{{index="demo",modality="text",stage="{stage}"}}' in metrics
    assert 'xmodal_http_requests_total{path="/v1/search",status="200"}' in metrics


def test_embeddings_endpoint_is_openai_shaped(client: TestClient) -> None:
    r = client.post("/v1/embeddings", json={"input": ["one", "two words"], "model": DEFAULT_MODEL}).json()
    assert r["object"] == "list" and [d["index"] for d in r["data"]] == [0, 1]
    v = np.array(r["data"][0]["embedding"])
    assert v.shape == (384,) and abs(np.linalg.norm(v) - 1) < 1e-5
    assert r["usage"]["prompt_tokens"] == 3 + 4  # [CLS] one [SEP], [CLS] two words [SEP]
    b64 = client.post("/v1/embeddings", json={"input": "one", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype=np.float32)
    assert np.allclose(decoded, v, atol=1e-6)
    unknown = client.post("/v1/embeddings", json={"input": "x", "model": "other"})  # OpenAI: 404 model_not_found
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert unknown.json()["error"]["param"] == "model"
    assert client.post("/v1/embeddings", json={"input": []}).status_code == 400


def test_embeddings_with_token_vectors(client: TestClient, served_data: Path) -> None:
    r = client.post("/v1/embeddings", json={"input": ["one", "two more words"], "tokens": True}).json()
    shapes = [np.array(d["tokens"]).shape for d in r["data"]]
    assert shapes == [(3, 384), (5, 384)]  # [CLS] one [SEP]; [CLS] two more words [SEP]
    assert np.allclose(np.linalg.norm(np.array(r["data"][1]["tokens"]), axis=1), 1, atol=1e-5)
    b64 = client.post("/v1/embeddings", json={"input": "one", "tokens": True, "encoding_format": "base64"}).json()
    toks = np.frombuffer(base64.b64decode(b64["data"][0]["tokens"]), dtype="<f4").reshape(-1, 384)
    assert np.allclose(toks, r["data"][0]["tokens"], atol=1e-6)
    media = client.post("/v1/embeddings", json={"input": "aGVsbG8=", "modality": "image"})
    assert media.status_code == 400 and "not an image" in media.json()["error"]["message"]
    with make_client(served_data, model=TEXT_MODEL) as text_only:  # a model without the tower: 400, not 500
        media = text_only.post("/v1/embeddings", json={"input": "aGVsbG8=", "modality": "image"})
        assert media.status_code == 400 and "no image tower" in media.json()["error"]["message"]
    too_many = client.post("/v1/embeddings", json={"input": ["aGVsbG8="] * 33, "modality": "audio"})
    assert too_many.status_code == 400 and "1 to 32" in too_many.json()["error"]["message"]


def test_overload_is_429_with_retry_after(served_data: Path) -> None:
    with make_client(served_data, max_inflight=1) as c:
        state = c.app.state.xmodal
        state.admission.inflight = 1  # one search already running
        r = search(c, query={"text": "anything"})
        # a delay drawn in 1-3 s (retries spread out), in ms and rounded to whole seconds
        ms = int(r.headers["retry-after-ms"])
        assert r.status_code == 429 and 1000 <= ms <= 3000 and r.headers["retry-after"] == str(max(1, round(ms / 1000)))
        assert r.json()["error"]["code"] == "overloaded" and r.json()["error"]["details"]["retry_after_ms"] == ms
        state.admission.inflight = 0
        assert search(c, query={"text": "anything"}).status_code == 200


def test_not_ready_without_model(tmp_path: Path) -> None:
    with make_client(tmp_path) as c:
        assert c.get("/healthz").status_code == 200
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "xmodal models prepare" in ready.json()["model_error"]
        r = search(c, query={"text": "a"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"


def test_new_version_is_picked_up_and_old_results_are_not_served(
    tmp_path: Path, served_data: Path, encoder, demo_corpus: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(served_data, data)
    with make_client(data) as c:
        q = {"query": {"text": "a violinist plays"}, "k": 3}
        v1 = search(c, **q).json()
        assert search(c, **q).json()["cached"] is True
        items = read_jsonl(demo_corpus)[:100]
        build_index(indexes_dir=data / "indexes", name="demo", items=items, encoder=encoder, use_gpu=False)
        c.app.state.xmodal.registry.refresh()  # what the background watcher does every reload_interval_s
        v2 = search(c, **q).json()
        assert v2["index_version"] != v1["index_version"] and v2["cached"] is False
        assert c.get("/v1/indexes").json()["indexes"][0]["items"] == 100


def test_index_of_another_model_is_refused_and_old_version_kept(tmp_path: Path, served_data: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(served_data, data)
    with make_client(data) as c:
        good = search(c, query={"text": "a storm"}).json()["index_version"]
        # Publish a version whose manifest names another model fingerprint.
        vdir = data / "indexes" / "demo" / "versions"
        manifest = json.loads((vdir / f"{good}.json").read_text())
        manifest["model"]["fingerprint"] = "f" * 64
        manifest["version"] = "other-model"
        (vdir / "other-model.json").write_text(json.dumps(manifest))
        (data / "indexes" / "demo" / "CURRENT").write_text("other-model\n")
        c.app.state.xmodal.registry.refresh()
        r = search(c, query={"text": "a storm"})
        assert r.status_code == 200 and r.json()["index_version"] == good
        refused = c.get("/v1/indexes").json()["refused"]
        assert "has the fingerprint" in refused["demo"]
    with make_client(data) as fresh:  # a fresh service never loads it at all
        r = search(fresh, query={"text": "a storm"})
        assert r.status_code == 503 and "has the fingerprint" in r.json()["error"]["message"]


def test_body_that_is_not_a_json_object(client: TestClient) -> None:
    form = client.post("/v1/search", content=b'{"index": "demo"}', headers={"content-type": "text/plain"})
    assert form.status_code == 415 and "application/json" in form.json()["error"]["message"]
    array = client.post("/v1/search", json=[1, 2])
    assert array.status_code == 422 and array.json()["error"]["code"] == "invalid_request"


def test_file_upload_errors(client: TestClient) -> None:
    r = client.post("/v1/search/file", data={"index": "demo"}, files={"file": ("q.png", b"\x89PNG...", "image/png")})
    assert r.status_code == 400 and "not an image" in r.json()["error"]["message"]
    assert client.post("/v1/search/file", data={"index": "demo"}).status_code == 422  # no file
    empty = client.post("/v1/search/file", data={"index": "demo"}, files={"file": ("q.png", b"", "image/png")})
    assert empty.status_code == 400 and "empty" in empty.json()["error"]["message"]
    audio = client.post("/v1/search/file", data={"index": "demo"}, files={"file": ("q.wav", b"RIFF", "audio/wav")})
    assert audio.status_code == 400 and "audio data" in audio.json()["error"]["message"]
    bad_k = client.post("/v1/search/file", data={"index": "demo", "k": "0"}, files={"file": ("q", b"x", "image/png")})
    assert bad_k.status_code == 422
