"""clip-retrieval back-end compatibility, through clip-retrieval's own ``ClipClient`` against the real service on a
real port, over the tri-modal `media` index; every answer checked against `/v1/search` for the same query.

clip-retrieval is installed with ``--no-deps`` (``make test``): its package ``__init__`` imports its whole back end
(torch, flask, faiss, ...), so the client's module file is loaded by itself; it needs only ``requests``."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.settings import Settings
from tests.conftest import ServerThread

pytestmark = pytest.mark.slow
requests = pytest.importorskip("requests", reason="requests is in the `dev` extra (ClipClient needs it)")


def load_clip_client():
    """clip_retrieval/clip_client.py as published, without running the package's __init__."""
    spec = importlib.util.find_spec("clip_retrieval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("clip-retrieval is not installed: `make test` installs it (pip install --no-deps clip-retrieval)")
    path = Path(next(iter(spec.submodule_search_locations))) / "clip_client.py"
    module_spec = importlib.util.spec_from_file_location("clip_retrieval_clip_client", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def clip():
    return load_clip_client()


@pytest.fixture(scope="module")
def server(late_data: Path):
    with ServerThread(Settings(data_dir=late_data, reload_interval_s=0)) as s:
        yield s


def client(clip, server: ServerThread, **options):
    return clip.ClipClient(url=f"{server.url}/knn-service", indice_name="media", **options)


def v1_search(server: ServerThread, query: dict, k: int, modality: str) -> list[dict]:
    # `filter: {}` matches every item but keys the result cache apart: a fresh search, not the knn query's answer.
    body = {"index": "media", "query": query, "k": k, "modalities": [modality], "filter": {}}
    r = requests.post(f"{server.url}/v1/search", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["cached"] is False
    return r.json()["results"]


def embed(server: ServerThread, inputs: list[str], modality: str) -> np.ndarray:
    r = requests.post(f"{server.url}/v1/embeddings", json={"input": inputs, "modality": modality}, timeout=60)
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)


def without_near_duplicates(results: list[dict], vectors: np.ndarray) -> list[dict]:
    """What clip_back's deduplicate keeps: of each group of results linked (transitively) by a cosine above 0.94,
    the best ranked. Here a plain walk over the links, from the items' own files and captions re-encoded."""
    linked = vectors @ vectors.T > 0.94
    seen, keep = set(), []
    for i in range(len(results)):
        if i in seen:
            continue
        keep.append(results[i])
        todo = [i]
        seen.add(i)
        while todo:
            for j in np.flatnonzero(linked[todo.pop()]):
                if int(j) not in seen:
                    seen.add(int(j))
                    todo.append(int(j))
    return keep


def expected(server: ServerThread, corpus: Path, query: dict, k: int, modality: str) -> list[dict]:
    """/v1/search's answer, deduplicated as clip_back does (ClipClient asks for it by default)."""
    results = v1_search(server, query, k, modality)
    if modality == "text":
        vectors = embed(server, [r["text"] for r in results], "text")
    else:
        files = [(corpus.parent / "images" / f"{r['id']}.png").read_bytes() for r in results]
        vectors = embed(server, [base64.b64encode(f).decode() for f in files], "image")
    return without_near_duplicates(results, vectors)


def post_raw(server: ServerThread, path: str, body) -> requests.Response:
    """As ClipClient and clip-front post: a JSON string as the body, no JSON content type."""
    return requests.post(f"{server.url}{path}", data=body if isinstance(body, str) else json.dumps(body), timeout=60)


def assert_same(knn: list[dict], reference: list[dict]) -> None:
    assert [r["xmodal_id"] for r in knn] == [r["id"] for r in reference]
    assert [r["similarity"] for r in knn] == pytest.approx([r["similarity"] for r in reference], abs=1e-6)


def picture(column: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(column)))
    assert image.format == "JPEG"
    return image


def test_text_query_finds_pictures_as_v1_search(clip, server: ServerThread, media_corpus: Path) -> None:
    results = client(clip, server, num_images=5).query(text="two red circles")
    assert len(results) == 5  # no near duplicates among these five
    for r in results:
        assert isinstance(r["id"], int) and 0 <= r["id"] < 2**53
        assert isinstance(r["similarity"], float) and r["caption"] and r["kind"] == "picture"
        assert r["xmodal_id"].startswith("img-")
        assert picture(r["image"]).size == (256, 256)
    assert len({r["id"] for r in results}) == 5
    assert_same(results, expected(server, media_corpus, {"text": "two red circles"}, 5, "image"))


def test_image_file_finds_itself_first(clip, server: ServerThread, media_corpus: Path) -> None:
    path = media_corpus.parent / "images" / "img-00003.png"
    results = client(clip, server, num_images=4).query(image=str(path))
    assert results[0]["xmodal_id"] == "img-00003" and results[0]["similarity"] == pytest.approx(1.0, abs=1e-3)
    query = {"image": base64.b64encode(path.read_bytes()).decode()}
    assert_same(results, expected(server, media_corpus, query, 4, "image"))


def test_embedding_input_answers_as_the_text_it_embeds(clip, server: ServerThread, media_corpus: Path) -> None:
    vector = embed(server, ["three blue squares"], "text")[0].tolist()
    by_vector = client(clip, server, num_images=6).query(embedding_input=vector)
    assert_same(by_vector, expected(server, media_corpus, {"embedding": vector}, 6, "image"))
    by_text = client(clip, server, num_images=6).query(text="three blue squares")
    assert [r["id"] for r in by_vector] == [r["id"] for r in by_text]


def test_modality_text_searches_the_captions(clip, server: ServerThread, media_corpus: Path) -> None:
    texts = client(clip, server, num_images=8, modality=clip.Modality.TEXT).query(text="a rising chirp")
    assert_same(texts, expected(server, media_corpus, {"text": "a rising chirp"}, 8, "text"))
    assert any(r["xmodal_id"].startswith("snd-") for r in texts)  # captions of sounds are text rows too
    # An item has one int id whatever the modality that matched: its image row and its text row agree.
    images = client(clip, server, num_images=40).query(text="a rising chirp")
    by_item = {r["xmodal_id"]: r["id"] for r in images}
    captions = client(clip, server, num_images=120, modality=clip.Modality.TEXT).query(text="a rising chirp")
    shared = [r for r in captions if r["xmodal_id"] in by_item]
    assert shared and all(r["id"] == by_item[r["xmodal_id"]] for r in shared)


def test_deduplicate_drops_near_duplicates_as_clip_back(clip, server: ServerThread, media_corpus: Path) -> None:
    """Several sounds share a caption: searching the captions, clip_back's deduplicate keeps one of each."""
    every = client(clip, server, num_images=20, modality=clip.Modality.TEXT, deduplicate=False)
    once = client(clip, server, num_images=20, modality=clip.Modality.TEXT)  # deduplicate=True: ClipClient's default
    all_results, kept = every.query(text="a rising chirp"), once.query(text="a rising chirp")
    assert_same(all_results, v1_search(server, {"text": "a rising chirp"}, 20, "text"))
    assert len(kept) < len(all_results)
    assert [r["xmodal_id"] for r in kept] == [r["xmodal_id"] for r in all_results if r in kept]  # order kept
    reference = without_near_duplicates(all_results, embed(server, [r["caption"] for r in all_results], "text"))
    assert [r["id"] for r in kept] == [r["id"] for r in reference]


def test_num_images_carry_metadata_and_num_result_ids_the_rest(server: ServerThread) -> None:
    body = {"text": "one green triangle", "modality": "image", "num_images": 3, "num_result_ids": 8}
    r = post_raw(server, "/knn-service", {**body, "indice_name": "media"})
    assert r.status_code == 200, r.text
    results = r.json()
    assert len(results) == 8
    assert all("caption" in x and "image" in x for x in results[:3])
    assert all(set(x) == {"id", "similarity"} for x in results[3:])
    sims = [x["similarity"] for x in results]
    assert sims == sorted(sims, reverse=True)
    # clip_back's defaults: no indice_name is the first index; num_result_ids defaults to num_images.
    r = post_raw(server, "/knn-service", {"text": "one green triangle", "num_images": 2, "indice_name": None})
    assert [x["id"] for x in r.json()] == [x["id"] for x in results[:2]]


def test_indices_list(server: ServerThread) -> None:
    r = requests.get(f"{server.url}/indices-list", timeout=60)
    assert r.status_code == 200 and r.json() == ["media"]


def test_metadata_maps_int_ids_back(clip, server: ServerThread) -> None:
    results = client(clip, server, num_images=5).query(text="two small yellow circles")
    ids = [r["id"] for r in results][::-1]
    r = post_raw(server, "/metadata", {"ids": ids, "indice_name": "media"})
    assert r.status_code == 200, r.text
    metas = r.json()
    assert [m["id"] for m in metas] == ids
    by_id = {x["id"]: x for x in results}
    for m in metas:
        expected = {k: v for k, v in by_id[m["id"]].items() if k not in ("id", "similarity")}
        assert m["metadata"] == expected
    assert post_raw(server, "/metadata", {"ids": [], "indice_name": "media"}).json() == []


def test_metadata_refuses_ids_of_another_version(clip, server: ServerThread) -> None:
    good = client(clip, server, num_images=1).query(text="two red circles")[0]["id"]
    row = good & (2**32 - 1)
    other_version = ((good >> 32) ^ 1) << 32 | row  # the same row under another version's tag
    for bad in (other_version, good + 10**6, -1):
        r = post_raw(server, "/metadata", {"ids": [good, bad], "indice_name": "media"})
        assert r.status_code == 404, r.text
        error = r.json()["error"]
        assert error["code"] == "id_not_in_served_version" and "search again" in error["message"]
    r = post_raw(server, "/metadata", {"ids": [good], "indice_name": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "index_not_found"


def test_options_clip_back_ignores_are_accepted(server: ServerThread) -> None:
    # As clip_back started without a safety model, violence detector or aesthetic embeddings.
    base = {"text": "two red circles", "modality": "image", "num_images": 3, "indice_name": "media"}
    plain = post_raw(server, "/knn-service", base).json()
    extras = {
        "use_safety_model": True,
        "use_violence_detector": True,
        "aesthetic_score": "9",
        "aesthetic_weight": 0.5,
        "image_url": None,
        "embedding_input": None,
        "some_future_field": 1,
    }
    r = post_raw(server, "/knn-service", {**base, **extras})
    assert r.status_code == 200 and r.json() == plain


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"image_url": "http://127.0.0.1/x.png"}, 400, "image_url"),
        ({"text": "two red circles", "use_mclip": True}, 400, "use_mclip"),
        ({"text": ""}, 400, "one of text, image or embedding_input"),
        ({"text": "x", "modality": "audio"}, 422, "modality"),
        ({"text": "x", "num_images": -1}, 422, "num_images"),
        ({"image": "not base64!"}, 400, "base64"),
        ({"embedding_input": [0.1, 0.2]}, 400, "embedding"),
        ({"text": "x", "indice_name": "nope"}, 404, "nope"),
    ],
)
def test_refusals_are_clear_4xx(server: ServerThread, body: dict, status: int, says: str) -> None:
    r = post_raw(server, "/knn-service", {"modality": "image", "num_images": 3, "indice_name": "media", **body})
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"]


def test_malformed_bodies_are_400_not_500(server: ServerThread) -> None:
    for path in ("/knn-service", "/metadata"):
        for body in ("{not json", "\xff", "[1, 2]"):
            r = post_raw(server, path, body)
            assert r.status_code in (400, 422), (path, body, r.text)
            assert "error" in r.json()


def test_v1_search_still_wants_a_json_content_type(server: ServerThread) -> None:
    r = post_raw(server, "/v1/search", {"index": "media", "query": {"text": "two red circles"}})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
