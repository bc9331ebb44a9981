"""CLIP / SigLIP export: tiny random checkpoints laid out like downloaded ones, exported to two-tower bundles and
checked independently of the exporter against transformers' own ``get_text_features`` / ``get_image_features``.

Tokenizers: CLIP gets a real ``CLIPTokenizer`` written from OpenAI's BPE merges (``../shared/data/clip-bpe``,
49,408 tokens); where that folder is absent, the same tokenizer with no merges (byte-level characters only,
514 tokens), so the export is still tested on a fresh clone. SigLIP's own tokenizer needs sentencepiece, which
the export extra does not install, so it gets a tiny WordPiece tokenizer from the ``tokenizers`` library with
SigLIP's special-token layout: ``</s>`` is both EOS (appended to every text) and the pad token.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.bundle import verify_bundle
from models.errors import ExportError, ParityError
from models.runtime import create_session
from models.text import TextPreprocessor
from tests.checkpoints import PATCHES, make_clip_checkpoint, make_siglip_checkpoint

torch = pytest.importorskip("torch", reason="export tests need the `export` extra (torch)")
transformers = pytest.importorskip("transformers", reason="export tests need the `export` extra (transformers)")

pytestmark = pytest.mark.slow

# Unlike the exporter's parity texts: other words, other lengths, padding inside the batch.
TEXTS = [
    "a dog playing in the snow",
    "cat",
    "two red bicycles against a brick wall next to a small cafe in the morning light",
    "the wing",
    " ".join(["a photo of two dogs in the snow"] * 12),  # longer than both models' positions: truncated
]


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip_checkpoint(tmp_path_factory.mktemp("clip-checkpoint"))


@pytest.fixture(scope="module")
def siglip_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_siglip_checkpoint(tmp_path_factory.mktemp("siglip-checkpoint"))


@pytest.fixture(scope="module")
def models_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clip-models")


@pytest.fixture(scope="module")
def exported(request: pytest.FixtureRequest, models_out: Path) -> dict:
    """arch -> (checkpoint, bundle folder, manifest, torch model); each exported once per module, on first use."""
    from models.export.clip import export_clip

    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            source = request.getfixturevalue(f"{arch}_checkpoint")
            manifest = export_clip(source, models_out, f"tiny-{arch}")  # arch detected from config.json
            model_cls = transformers.CLIPModel if arch == "clip" else transformers.SiglipModel
            cache[arch] = (source, models_out / f"tiny-{arch}", manifest, model_cls.from_pretrained(str(source)).eval())
        return cache[arch]

    return get


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def pooled(out) -> np.ndarray:
    """get_*_features: a ModelOutput (transformers 5) or the tensor itself (4.x)."""
    return (out if isinstance(out, torch.Tensor) else out.pooler_output).detach().numpy()


def noise_images() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    sizes = [(40, 32), (32, 57), (64, 64)]  # landscape, portrait, square: resize and crop both matter for CLIP
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


# --- the bundle -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["clip", "siglip"])
def test_manifest_describes_two_towers_and_verifies(arch: str, exported, models_out: Path) -> None:
    source, bundle, manifest, _model = exported(arch)
    assert verify_bundle(bundle).fingerprint == manifest.fingerprint and len(manifest.fingerprint) == 64
    assert sorted(p.name for p in bundle.iterdir()) == ["image.onnx", "manifest.json", "text.onnx", "tokenizer.json"]
    assert not [p for p in models_out.iterdir() if p.name.startswith(".")]  # no staging folder left
    assert manifest.dim == (16 if arch == "clip" else 32) and manifest.similarity == "cosine"
    assert sorted(manifest.towers) == ["image", "text"]
    text, image = manifest.towers["text"], manifest.towers["image"]
    assert text.inputs == (["input_ids", "attention_mask"] if arch == "clip" else ["input_ids"])
    assert image.inputs == ["pixel_values"]
    for tower in (text, image):
        assert tower.outputs == ["embedding", "tokens", "token_mask"] and tower.emits_tokens
    t = text.preprocessing
    assert t.tokenizer == "tokenizer.json"
    if arch == "clip":
        pad_id = transformers.AutoTokenizer.from_pretrained(str(source)).pad_token_id  # <|endoftext|>
        assert (t.max_length, t.pad_to_max_length, t.pad_id) == (77, False, pad_id)
        i = image.preprocessing
        assert (i.resize_mode, i.size, i.crop_size, i.resample) == ("shortest_edge", 32, 32, "bicubic")
    else:
        assert (t.max_length, t.pad_to_max_length, t.pad_id) == (64, True, 1)
        i = image.preprocessing
        assert (i.resize_mode, i.size, i.crop_size, i.mean) == ("exact", 32, None, [0.5, 0.5, 0.5])
    assert manifest.source["kind"] == f"hf-{arch}"
    for name in ("text", "image"):
        parity = manifest.parity[name]
        assert parity["min_cosine"] >= 0.9999 and parity["max_abs_diff"] <= 1e-4, parity
        assert parity["shapes"] and all(shape != parity["trace_shape"] for shape in parity["shapes"])
    assert {s[0] for s in manifest.parity["image"]["shapes"]} >= {1, 3}  # other batch sizes than the trace's 2
    assert len({s[1] for s in manifest.parity["text"]["shapes"]}) >= 2  # several text lengths


# --- the towers against transformers ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["clip", "siglip"])
def test_text_tower_matches_get_text_features(arch: str, exported) -> None:
    source, bundle, manifest, model = exported(arch)
    tower = manifest.towers["text"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(source))
    if arch == "clip":
        hf = hf_tok(TEXTS, padding=True, truncation=True, max_length=77, return_tensors="np")
    else:  # as SigLIP was trained, and as its model card says: padding="max_length" (64), no attention mask
        hf = hf_tok(TEXTS, padding="max_length", max_length=64, truncation=True, return_tensors="np")
    feed = TextPreprocessor.from_config(bundle, tower.preprocessing)(TEXTS)  # what the service will feed
    np.testing.assert_array_equal(feed["input_ids"], hf["input_ids"])
    session, _ = create_session(bundle / tower.onnx, device="cpu")
    emb, tokens, mask = session.run(None, {name: feed[name] for name in tower.inputs})

    ids = torch.from_numpy(hf["input_ids"])
    with torch.inference_mode():
        if arch == "clip":
            attn = torch.from_numpy(hf["attention_mask"])
            ref_emb = pooled(model.get_text_features(input_ids=ids, attention_mask=attn))
            hidden = model.text_model(input_ids=ids, attention_mask=attn).last_hidden_state.numpy()
            ref_tokens = unit(hidden @ model.text_projection.weight.numpy().T)
            ref_mask = hf["attention_mask"]
        else:
            ref_emb = pooled(model.get_text_features(input_ids=ids))
            hidden = model.text_model(input_ids=ids).last_hidden_state.numpy()
            head = model.text_model.head
            ref_tokens = unit(hidden @ head.weight.numpy().T + head.bias.numpy())
            # The real tokens are the text's own: pad == EOS, so the EOS is counted as padding.
            lengths = [len(hf_tok(t, truncation=True, max_length=64)["input_ids"]) - 1 for t in TEXTS]
            ref_mask = (np.arange(64)[None, :] < np.array(lengths)[:, None]).astype(np.int32)
    assert emb.shape == (len(TEXTS), manifest.dim) and tokens.shape == (*ids.shape, manifest.dim)
    assert np.abs(emb - unit(ref_emb)).max() < 1e-4
    assert mask.dtype == np.int32 and mask.shape == ids.shape
    np.testing.assert_array_equal(mask, ref_mask)
    assert 0 < mask.sum(1).min() < mask.sum(1).max() <= ids.shape[1]  # real padding inside the batch
    real = mask.astype(bool)
    assert np.abs(tokens[real] - ref_tokens[real]).max() < 1e-4
    assert np.allclose(np.linalg.norm(tokens[real], axis=-1), 1, atol=1e-5)
    if arch == "clip":  # the embedding is the EOS token's vector
        eos = (hf["input_ids"] == hf_tok.eos_token_id).argmax(1)
        assert np.abs(tokens[np.arange(len(TEXTS)), eos] - emb).max() < 1e-5


@pytest.mark.parametrize("arch", ["clip", "siglip"])
def test_image_tower_matches_get_image_features(arch: str, exported) -> None:
    from models.image import ImagePreprocessor

    source, bundle, manifest, model = exported(arch)
    tower = manifest.towers["image"]
    processor = transformers.AutoImageProcessor.from_pretrained(str(source))
    images = noise_images()
    pixels = np.asarray(processor(images=images, return_tensors="np")["pixel_values"], dtype=np.float32)
    session, _ = create_session(bundle / tower.onnx, device="cpu")
    emb, tokens, mask = session.run(None, {"pixel_values": pixels})

    pv = torch.from_numpy(pixels)
    with torch.inference_mode():
        ref_emb = unit(pooled(model.get_image_features(pixel_values=pv)))
        vision = model.vision_model
        hidden = vision(pixel_values=pv).last_hidden_state
        if arch == "clip":  # the patches (CLS dropped) through post_layernorm and the projection, like CLS
            ln = vision.post_layernorm
            patches = torch.nn.functional.layer_norm(hidden[:, 1:], (hidden.shape[-1],), ln.weight, ln.bias, ln.eps)
            ref_tokens = unit(patches.numpy() @ model.visual_projection.weight.numpy().T)
        else:  # what the attention-pooling head itself gives for an image made of that one patch
            ref_tokens = unit(np.stack([vision.head(hidden[:, i : i + 1]).numpy() for i in range(PATCHES)], axis=1))
    assert emb.shape == (len(images), manifest.dim)
    assert np.abs(emb - ref_emb).max() < 1e-4
    assert tokens.shape == (len(images), PATCHES, manifest.dim)
    assert np.abs(tokens - ref_tokens).max() < 1e-4
    assert mask.dtype == np.int32 and mask.shape == (len(images), PATCHES) and mask.all()

    # End to end: the bundle's own (torch-free) preprocessing gives the same embeddings.
    ours = ImagePreprocessor.from_config(tower.preprocessing)(images)["pixel_values"]
    assert np.abs(session.run(["embedding"], {"pixel_values": ours})[0] - ref_emb).max() < 1e-4


# --- refusals ---------------------------------------------------------------------------------------------------
def test_other_model_types_and_wrong_arch_are_refused(tmp_path: Path, clip_checkpoint: Path) -> None:
    from models.export.clip import export_clip

    out = tmp_path / "models"
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(ExportError, match="'bert' model.*clip.*siglip"):
        export_clip(bert, out, "x")
    with pytest.raises(ExportError, match="no config.json"):
        export_clip(tmp_path / "nothing", out, "x")
    with pytest.raises(ExportError, match="unknown arch"):
        export_clip(clip_checkpoint, out, "x", arch="blip")
    with pytest.raises(ExportError, match="not siglip"):
        export_clip(clip_checkpoint, out, "x", arch="siglip")
    assert not out.exists() or not list(out.iterdir())


def test_a_graph_that_differs_from_torch_is_refused_and_nothing_is_written(
    tmp_path: Path, clip_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the text graph is exported, a torch weight changes: parity must catch it, and no bundle appears."""
    import models.export.base as eb
    from models.export.clip import export_clip

    real_export = eb.export_onnx

    def export_then_change_the_model(torch_, module, path, *args, **kwargs):
        real_export(torch_, module, path, *args, **kwargs)
        with torch.no_grad():
            module.model.text_model.final_layer_norm.bias.add_(1.0)  # (a uniform scale would normalise away)

    monkeypatch.setattr(eb, "export_onnx", export_then_change_the_model)
    out = tmp_path / "models"
    with pytest.raises(ParityError, match="text tower.*no bundle written") as info:
        export_clip(clip_checkpoint, out, "broken")
    assert info.value.details["min_cosine"] < 0.9999 or info.value.details["max_abs_diff"] > 1e-4
    assert list(out.iterdir()) == []  # neither the bundle nor a staging folder


def test_a_checkpoint_without_tokenizer_json_gets_one_from_its_vocab_and_merges(
    tmp_path: Path, clip_checkpoint: Path
) -> None:
    from tokenizers import Tokenizer

    from models.export.base import write_tokenizer as _write_tokenizer

    slow = tmp_path / "slow"
    slow.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "config.json"):
        shutil.copyfile(clip_checkpoint / name, slow / name)
    _write_tokenizer(slow, tmp_path / "tokenizer.json")
    made = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    shipped = Tokenizer.from_file(str(clip_checkpoint / "tokenizer.json"))
    for text in TEXTS:
        assert made.encode(text).ids == shipped.encode(text).ids
