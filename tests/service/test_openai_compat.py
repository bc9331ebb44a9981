"""OpenAI compatibility, tested with the real `openai` client against the real service on a real port: embeddings
(float and the client's default base64), `/v1/models`, `dimensions`, media inputs as data URIs, and errors the
client raises with the service's message."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.bundle import DEFAULT_MODEL
from models.encoder import Encoder
from service.settings import Settings
from tests.conftest import ServerThread

openai = pytest.importorskip("openai", reason="the openai client is in the `dev` extra")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(served_data: Path):
    with ServerThread(Settings(data_dir=served_data, reload_interval_s=0, max_response_floats=50_000)) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_models_and_embeddings_match_the_encoder(client, encoder: Encoder) -> None:
    listed = client.models.list()
    assert [m.id for m in listed.data] == [DEFAULT_MODEL] and listed.data[0].owned_by == "xmodal"
    texts = ["a red circle", "three short high beeps"]
    expected = encoder.encode_text(texts)
    # unasked, the client requests base64 and decodes it itself; asked, it hands the base64 string over
    for encoding_format in (openai.NOT_GIVEN, "float", "base64"):
        out = client.embeddings.create(model=DEFAULT_MODEL, input=texts, encoding_format=encoding_format)
        rows = [d.embedding for d in out.data]
        if encoding_format == "base64":
            rows = [np.frombuffer(base64.b64decode(r), dtype="<f4") for r in rows]
        got = np.array(rows, dtype=np.float32)
        assert got.shape == (2, encoder.dim) and np.abs(got - expected).max() < 1e-5
    assert out.model == DEFAULT_MODEL and out.usage.prompt_tokens == sum(encoder.count_tokens(texts))


def test_dimensions_are_refused_for_a_model_that_is_not_matryoshka(client) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=DEFAULT_MODEL, input="a red circle", dimensions=128)
    assert "not declared Matryoshka" in caught.value.message and caught.value.param == "dimensions"
    full = client.embeddings.create(model=DEFAULT_MODEL, input="a red circle", dimensions=384)
    assert len(full.data[0].embedding) == 384  # the model's own size is always fine


def test_dimensions_truncate_and_renormalise_for_a_declared_matryoshka_model(tmp_path: Path, served_data: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(served_data / "models", data / "models")
    manifest = data / "models" / DEFAULT_MODEL / "manifest.json"
    # the declaration is metadata, outside the fingerprint (which covers the graphs and preprocessing)
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "matryoshka_dims": [128, 256]}))
    with ServerThread(Settings(data_dir=data, reload_interval_s=0)) as server:
        c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        full = np.array(c.embeddings.create(model=DEFAULT_MODEL, input="a red circle").data[0].embedding)
        short = np.array(
            c.embeddings.create(model=DEFAULT_MODEL, input="a red circle", dimensions=128).data[0].embedding
        )
        assert short.shape == (128,) and np.linalg.norm(short) == pytest.approx(1.0, abs=1e-5)
        assert np.abs(short - full[:128] / np.linalg.norm(full[:128])).max() < 1e-5
        with pytest.raises(openai.BadRequestError, match=r"can be shortened to \[128, 256\]"):
            c.embeddings.create(model=DEFAULT_MODEL, input="x", dimensions=100)
        assert c.models.list().data[0].matryoshka_dims == [128, 256]


def test_media_data_uris_are_embedded_as_media(client, encoder: Encoder, media_corpus: Path) -> None:
    png = media_corpus.parent / "images" / "img-00003.png"
    uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    out = client.embeddings.create(model=DEFAULT_MODEL, input=[uri])  # no modality: told by the data URI
    expected = encoder.encode_media("image", [encoder.decode("image", png)])[0]
    assert np.abs(np.array(out.data[0].embedding) - expected).max() < 1e-5
    with pytest.raises(openai.BadRequestError, match="one modality per request"):
        client.embeddings.create(model=DEFAULT_MODEL, input=[uri, "a caption"])
    with pytest.raises(openai.BadRequestError, match="set `modality`"):
        client.embeddings.create(model=DEFAULT_MODEL, input=[uri], extra_body={"modality": "text"})


def test_raw_base64_media_is_detected_or_refused_never_embedded_as_text(client, media_corpus: Path) -> None:
    png = (media_corpus.parent / "images" / "img-00003.png").read_bytes()
    raw = base64.b64encode(png).decode()
    as_uri = client.embeddings.create(model=DEFAULT_MODEL, input=["data:image/png;base64," + raw])
    as_raw = client.embeddings.create(model=DEFAULT_MODEL, input=[raw])  # no data URI, no modality: by its bytes
    assert as_raw.data[0].embedding == as_uri.data[0].embedding
    with pytest.raises(openai.BadRequestError, match="not text: set `modality`"):
        client.embeddings.create(model=DEFAULT_MODEL, input=[raw], extra_body={"modality": "text"})
    with pytest.raises(openai.BadRequestError, match="one modality per request"):
        client.embeddings.create(model=DEFAULT_MODEL, input=[raw, "a caption"])
    unknown = base64.b64encode(bytes(range(256)) * 4).decode()  # base64 data of no known format
    with pytest.raises(
        openai.BadRequestError, match=r"input\[0\] is base64 data of no image or audio format"
    ) as caught:
        client.embeddings.create(model=DEFAULT_MODEL, input=[unknown])
    assert caught.value.param == "modality"
    text = client.embeddings.create(
        model=DEFAULT_MODEL, input=["//todoFixThisLater", "a purple giraffe reads the morning newspaper"]
    )  # still texts
    assert len(text.data) == 2 and text.usage.prompt_tokens > 0


def test_errors_reach_the_client_with_the_services_message(client) -> None:
    with pytest.raises(openai.NotFoundError, match="is not loaded; loaded: "):
        client.embeddings.create(model="text-embedding-3-small", input="a")
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.embeddings.create(model=DEFAULT_MODEL, input="a", encoding_format="floats")
    assert caught.value.param == "encoding_format" and "float" in caught.value.message
    with pytest.raises(openai.APIStatusError) as too_big:  # token vectors past XMODAL_MAX_RESPONSE_FLOATS
        client.embeddings.create(model=DEFAULT_MODEL, input=["word " * 200], extra_body={"tokens": True})
    assert too_big.value.status_code == 413 and "over the limit of 50,000" in too_big.value.message
