"""/metrics of a real server (uvicorn in a thread) after real searches: each stage of a query (result cache, embedding
cache, decode, queue wait, encode, dense search, late rerank) is timed by index and query modality, an embeddings
request under index "-"; batch sizes by model and lane; an index the service does not serve leaves no series."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from models.bundle import DEFAULT_MODEL
from models.encoder import Encoder
from service.settings import Settings
from tests.conftest import ServerThread

STAGE = "xmodal_search_stage_seconds"


def samples(client: httpx.Client) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics, by (name, its labels)."""
    text = client.get("/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def stage_counts(found: dict[tuple[str, frozenset], float]) -> dict[tuple[str, str, str], float]:
    """How many times each (stage, index, modality) was timed."""
    return {
        (labels["stage"], labels["index"], labels["modality"]): value
        for (name, pairs), value in found.items()
        if name == f"{STAGE}_count" and (labels := dict(pairs))
    }


def png_b64(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_each_stage_is_timed_by_index_and_modality(late_data: Path) -> None:
    model = Encoder(late_data / "models" / DEFAULT_MODEL, device="cpu", verify=False)
    label = f"{model.name}@{model.fingerprint[:12]}"
    image = {"index": "media", "query": {"image": png_b64(1)}, "k": 3}
    with (
        ServerThread(Settings(data_dir=late_data, reload_interval_s=0)) as srv,
        httpx.Client(base_url=srv.url, timeout=60) as c,
    ):
        before = samples(c)
        assert stage_counts(before) == {}
        assert c.post("/v1/search", json=image).json()["cached"] is False
        assert c.post("/v1/search", json=image).json()["cached"] is True  # the result cache answers: no stage below
        late = {"index": "media", "query": {"text": "a dog barks"}, "mode": "late", "k": 3}
        assert c.post("/v1/search", json=late).status_code == 200
        assert c.post("/v1/embeddings", json={"input": ["one", "two"]}).status_code == 200
        assert c.post("/v1/search", json={"index": "nope", "query": {"text": "x"}}).status_code == 404
        after = samples(c)

    assert stage_counts(after) == {
        ("result_cache", "media", "image"): 2,
        ("embedding_cache", "media", "image"): 1,
        ("decode", "media", "image"): 1,
        ("queue", "media", "image"): 1,
        ("encode", "media", "image"): 1,
        ("search", "media", "image"): 1,
        ("result_cache", "media", "text"): 1,
        ("embedding_cache", "media", "text"): 1,
        ("queue", "media", "text"): 1,
        ("encode", "media", "text"): 1,
        ("late_rerank", "media", "text"): 1,
        ("embedding_cache", "-", "text"): 1,  # one lookup pass for the request's two inputs
        ("queue", "-", "text"): 2,  # each query's wait and encode
        ("encode", "-", "text"): 2,
    }
    assert not [key for key in after if ("index", "nope") in key[1]]  # not served: no series for it
    # the time observed is real time: every stage took some
    sums = {dict(k[1])["stage"]: v for k, v in after.items() if k[0] == f"{STAGE}_sum"}
    assert all(v > 0 for v in sums.values()), sums

    def batches(lane: str) -> tuple[float, float]:
        labels = frozenset({"model": label, "lane": lane}.items())
        return after[("xmodal_batch_size_count", labels)], after[("xmodal_batch_size_sum", labels)]

    # by model and lane: the image query, the late text query's token lane, the two texts of /v1/embeddings
    assert batches("image") == (1, 1) and batches("text+tokens") == (1, 1) and batches("text") == (1, 2)
