"""`mode: late` through the real app: a tri-modal index with a token store, text and media queries, explain."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings


@pytest.fixture(scope="module")
def client(late_data: Path):
    with TestClient(create_app(Settings(data_dir=late_data, reload_interval_s=0))) as c:
        yield c


def search(client: TestClient, **body):
    return client.post("/v1/search", json={"index": "media", **body})


def test_late_text_query_ranks_pictures_and_explains_words(client: TestClient) -> None:
    body = {"query": {"text": "two red circles"}, "modalities": ["image"], "k": 5, "mode": "late"}
    r = search(client, **body, late={"explain": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["mode"] == "late" and len(out["results"]) == 5
    top = out["results"][0]
    assert top["modality"] == "image" and "red" in top["metadata"]["shows"]
    words = [m["query_text"] for m in top["matches"]]
    assert words[0] == "[CLS]" and "red" in words and "circles" in words
    assert all(m["modality"] == "image" and m["where"].startswith("patch row") for m in top["matches"])
    assert sum(m["similarity"] for m in top["matches"]) / len(words) == pytest.approx(top["similarity"], abs=1e-4)
    # without explain: no matches; the same request again comes from the result cache
    plain = search(client, **body)
    assert plain.json()["results"][0].get("matches") is None
    assert [x["id"] for x in plain.json()["results"]] == [x["id"] for x in out["results"]]
    assert search(client, **body).json()["cached"] is True


def test_late_audio_query_and_text_item_words(client: TestClient, media_corpus: Path) -> None:
    sound = base64.b64encode((media_corpus.parent / "sounds" / "snd-00003.flac").read_bytes()).decode()
    r = search(client, query={"audio": sound}, mode="late", k=3, modalities=["audio"])
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["id"] == "snd-00003"  # a sound finds itself by its frames
    r = search(
        client,
        query={"text": "a fast beeping sound"},
        mode="late",
        k=3,
        modalities=["text"],
        late={"explain": True, "scope": "all", "depth": 16, "nprobe": 4},
    )
    assert r.status_code == 200, r.text
    top = r.json()["results"][0]
    assert top["modality"] == "text" and all(m["where"].startswith("word ") for m in top["matches"])


def embedding_hits(client: TestClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('xmodal_cache_lookups_total{kind="embedding",outcome="hit"}'):
            return float(line.split()[-1])
    return 0.0


def test_query_tokens_are_cached_apart_from_vectors(client: TestClient) -> None:
    text = {"text": "four yellow triangles"}
    first = search(client, query=text, mode="late", k=3).json()
    before = embedding_hits(client)
    again = search(client, query=text, mode="late", k=4).json()  # another result key, the same query tokens
    assert embedding_hits(client) == before + 1 and again["cached"] is False
    assert [r["id"] for r in again["results"][:3]] == [r["id"] for r in first["results"]]
    search(client, query=text, k=3)  # dense: a pooled vector, not the token entry
    assert embedding_hits(client) == before + 1


def test_listing_says_which_indexes_serve_late(client: TestClient) -> None:
    assert [(i["name"], i["late"]) for i in client.get("/v1/indexes").json()["indexes"]] == [("media", True)]


def test_mixed_modalities_are_calibrated(client: TestClient) -> None:
    r = search(client, query={"text": "a low hum"}, mode="late", k=10, modalities=["image", "audio"])
    results = r.json()["results"]
    assert {x["modality"] for x in results} <= {"image", "audio"}
    assert all(x["score"] != x["similarity"] for x in results)  # z-scores, not raw MaxSim


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"query": {"embedding": [0.1] * 384}, "mode": "late"}, 400, "raw embedding has no token vectors"),
        ({"query": {"text": "a"}, "late": {"depth": 8}}, 422, "apply to `mode: late` only"),
        ({"query": {"text": "a"}, "mode": "late", "late": {"depth": 0}}, 422, "greater than or equal to 1"),
        ({"query": {"text": "a"}, "mode": "late", "late": {"scope": "every"}}, 422, "modality"),
        ({"query": {"text": "a"}, "mode": "late", "late": {"unknown": 1}}, 422, "Extra inputs"),
    ],
)
def test_bad_late_requests(client: TestClient, body: dict, status: int, fragment: str) -> None:
    r = search(client, **body)
    assert r.status_code == status, r.text
    assert fragment in r.text


def test_late_heatmap_and_highlight_geometry(client: TestClient) -> None:
    """`late.heatmap` gives each query token's similarity to every token of the row it matched in; the page draws
    it over the thumbnail (a patch grid), the waveform (frames) or the caption (character offsets)."""
    for modality, query in (
        ("image", "two red circles"),
        ("audio", "three short high beeps"),
        ("text", "a red circle"),
    ):
        r = search(client, query={"text": query}, modalities=[modality], k=3, mode="late", late={"heatmap": True})
        assert r.status_code == 200, r.text
        for hit in r.json()["results"]:
            for m in hit["matches"]:  # heatmap implies explain
                heat = np.array(m["heat"])
                assert len(heat) > 1 and int(heat.argmax()) == m["item_token"]
                assert heat.max() == pytest.approx(m["similarity"], abs=1e-4)
                if modality == "image":  # xmodal-mini: a 4x4 patch grid, no class token
                    row, col = divmod(m["item_token"], 4)
                    assert m["box"] == pytest.approx([col / 4, row / 4, (col + 1) / 4, (row + 1) / 4])
                elif modality == "audio":
                    n = len(heat)
                    assert m["box"] == pytest.approx([m["item_token"] / n, 0, (m["item_token"] + 1) / n, 1], abs=1e-5)
                else:
                    start, end = m["chars"] or (0, 0)
                    word = m["where"].removeprefix("word ").strip("'")
                    if m["chars"] is not None:  # special tokens ([CLS], [SEP]) stand for no characters
                        assert hit["text"][start:end].lower() == word.removeprefix("##")
    plain = search(client, query={"text": "two red circles"}, k=3, mode="late", late={"explain": True})
    assert all(m.get("heat") is None for hit in plain.json()["results"] for m in hit["matches"])


def test_late_scope_all_deeper_than_a_modality_holds(client: TestClient) -> None:
    """Dense candidates come from each target modality's rows; a depth above one modality's row count (text has
    more rows than images here) once made arrays of unequal length meet (a 500)."""
    r = search(
        client, query={"text": "a red circle"}, mode="late", k=5, late={"scope": "all", "depth": 5000, "explain": True}
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 5


def test_explanations_past_the_response_limit_are_413_naming_what_to_lower(client: TestClient, late_data: Path) -> None:
    """XMODAL_MAX_RESPONSE_FLOATS bounds a late answer's explanations (8 per match, 1 per heat map value): the most a
    request can get is refused before the search; otherwise the real answer is counted before it is rendered. The
    limit is exact: an answer of exactly that many values is sent, one more is refused."""
    body = {"query": {"text": "two red circles"}, "modalities": ["image"], "k": 40, "mode": "late"}
    full = search(client, **body, late={"heatmap": True}).json()["results"]
    matches = sum(len(r["matches"]) for r in full)
    values = matches * 8 + sum(len(m["heat"]) for r in full for m in r["matches"])
    assert len(full) == 40 and values > 1024
    for limit, status in ((values, 200), (values - 1, 413)):
        settings = Settings(data_dir=late_data, reload_interval_s=0, max_response_floats=limit)
        with TestClient(create_app(settings)) as small:
            r = search(small, **body, late={"heatmap": True})
            assert r.status_code == status, r.text
            if status == 200:
                assert r.json()["results"] == full
                continue
            error = r.json()["error"]
            assert error["code"] == "response_too_large" and error["param"] == "late.heatmap"
            assert f"{values:,} values ({matches} matches in 40 results" in error["message"]
            assert f"over the limit of {limit:,} (XMODAL_MAX_RESPONSE_FLOATS)" in error["message"]
            assert "leave out `late.heatmap`, or lower `k`" in error["message"]
            # the most a request could get is refused before the search: k x query tokens matches
            r = search(small, **{**body, "k": 1000}, late={"explain": True})
            assert r.status_code == 413, r.text
            error = r.json()["error"]
            assert error["param"] == "k" and "up to " in error["message"] and "query tokens" in error["message"]
            assert "lower `k`, or leave out `late.explain`" in error["message"]
            assert search(small, **body).status_code == 200  # unexplained: no explanations to count
