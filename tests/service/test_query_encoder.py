"""The query encoder's text checks, one rule for searches and /v1/embeddings: a blank text or one over
XMODAL_MAX_TEXT_CHARS is a 400 naming the field at fault, before anything is encoded."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings


def test_texts_are_checked_alike_for_searches_and_embeddings(served_data: Path) -> None:
    with TestClient(create_app(Settings(data_dir=served_data, reload_interval_s=0, max_text_chars=20))) as c:
        long = "a comet over the hills"  # 22 characters
        r = c.post("/v1/search", json={"index": "demo", "query": {"text": long}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "query.text"
        assert r.json()["error"]["message"] == "query.text is 22 characters; the limit is 20"
        r = c.post("/v1/embeddings", json={"input": ["a comet", long]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input[1]"
        assert r.json()["error"]["message"] == "input[1] is 22 characters; the limit is 20"
        r = c.post("/v1/embeddings", json={"input": ["a comet", " \t "]})
        assert r.status_code == 400 and r.json()["error"]["message"] == "input[1] must not be empty"
        assert c.post("/v1/embeddings", json={"input": ["a comet", "rain"]}).status_code == 200
        batches = [line for line in c.get("/metrics").text.splitlines() if line.startswith("xmodal_batch_size_sum")]
        assert [float(line.split()[-1]) for line in batches] == [2.0]  # only the last request was encoded
