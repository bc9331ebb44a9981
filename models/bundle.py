"""The model bundle format: ``<models>/<name>/manifest.json`` plus one ONNX graph per tower.

The manifest is self-describing: it says which towers exist, their inputs, outputs and preprocessing, and
carries a ``fingerprint`` (sha256 over the ONNX files, tokenizer files and preprocessing config) that
index bundles record, so an index is never searched with vectors from another model.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.errors import BundleError, FingerprintMismatch, ModelNotFound, XmodalError
from models.files import atomic_write_json, read_json, replace_dir, sha256_file

FORMAT = "xmodal.model/1"
DEFAULT_MODEL = "xmodal-mini"  # the bundle `xmodal models prepare` makes and the service loads by default (models/mini)
MANIFEST = "manifest.json"
Modality = Literal["text", "image", "audio"]


class TextPreprocessing(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["text"] = "text"
    tokenizer: str = Field(description="tokenizers-library JSON file, relative to the bundle")
    max_length: int = Field(gt=0)
    pad_to_max_length: bool = Field(False, description="pad every text to max_length (SigLIP was trained so)")
    pad_id: int = Field(0, ge=0)

    @property
    def files(self) -> list[str]:
        return [self.tokenizer]


class ImagePreprocessing(BaseModel):
    """Reproduces a checkpoint's image processor with Pillow and numpy (no torch): RGB, resize, optional
    centre crop, rescale, normalise; channels first."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["image"] = "image"
    resize_mode: Literal["shortest_edge", "exact"] = Field(
        description="shortest_edge: scale so the short side is `size` (CLIP); exact: resize to size x size (SigLIP)"
    )
    size: int = Field(gt=0)
    crop_size: int | None = Field(None, gt=0, description="centre crop to crop_size x crop_size after resizing")
    resample: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    rescale_factor: float = 1 / 255
    mean: list[float] = Field(min_length=3, max_length=3)
    std: list[float] = Field(min_length=3, max_length=3)

    @property
    def files(self) -> list[str]:
        return []

    @property
    def output_size(self) -> int:
        return self.crop_size or self.size


class AudioPreprocessing(BaseModel):
    """Decode (any rate, mono or stereo) → mono float32 at ``sample_rate`` → the checkpoint's features,
    reproduced in numpy (no torch) by ``models.audio``. Fields follow transformers' ``ClapFeatureExtractor``,
    which also ties the mel filter bank to ``truncation``: Slaney scale and area norm for ``rand_trunc``
    (librosa's default), HTK scale without norm for ``fusion`` (torchaudio's)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["audio"] = "audio"
    sample_rate: int = Field(gt=0)
    clip_seconds: float = Field(gt=0, description="longer audio is truncated, shorter is padded to this")
    feature: Literal["clap_log_mel"] = "clap_log_mel"
    n_fft: int = Field(gt=1, multiple_of=2, description="STFT window (periodic Hann) and FFT size; frames centred")
    hop_length: int = Field(gt=0)
    n_mels: int = Field(gt=0)
    f_min: float = Field(0.0, ge=0)
    f_max: float = Field(gt=0)
    padding: Literal["repeatpad", "repeat", "pad"] = Field(
        "repeatpad", description="short clips: repeat whole copies then zero-pad / repeat and cut / zero-pad"
    )
    truncation: Literal["rand_trunc", "fusion"] = Field(
        "rand_trunc",
        description="long clips. rand_trunc: one clip, taken deterministically from the start (transformers picks "
        "a random offset); fusion: four mels (the whole clip shrunk in time, and its first, middle and last chunk; "
        "transformers picks random chunks), the model's is_longer input then says which clips were longer",
    )

    @model_validator(mode="after")
    def _check(self) -> AudioPreprocessing:
        samples = self.clip_seconds * self.sample_rate
        if abs(samples - round(samples)) > 1e-6:
            raise ValueError(f"clip_seconds * sample_rate must be a whole number of samples, not {samples}")
        if round(samples) <= self.n_fft // 2:
            raise ValueError(f"a clip of {round(samples)} samples is too short for n_fft={self.n_fft}")
        if self.f_min >= self.f_max:
            raise ValueError(f"f_min ({self.f_min}) must be below f_max ({self.f_max})")
        return self

    @property
    def clip_samples(self) -> int:
        return round(self.clip_seconds * self.sample_rate)

    @property
    def files(self) -> list[str]:
        return []


Preprocessing = Annotated[TextPreprocessing | ImagePreprocessing | AudioPreprocessing, Field(discriminator="kind")]


class Tower(BaseModel):
    model_config = ConfigDict(extra="forbid")
    onnx: str
    inputs: list[str]
    outputs: list[str]
    emits_tokens: bool
    preprocessing: Preprocessing


class ModelManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["xmodal.model/1"] = FORMAT
    name: str
    version: str
    fingerprint: str
    dim: int = Field(gt=0)
    similarity: Literal["cosine"] = "cosine"
    precision: Literal["fp32", "int8", "fp16"] = "fp32"
    towers: dict[Modality, Tower]
    source: dict = Field(default_factory=dict, description="where the weights came from and how")
    parity: dict = Field(default_factory=dict, description="torch vs ONNX figures measured at export")
    created_at: str
    matryoshka_dims: list[int] = Field(
        default_factory=list,
        description="shorter dimensions the model was trained to keep meaning at (Matryoshka): an embedding may be "
        "cut to one of these and renormalised; empty: only the full dim",
    )


def compute_fingerprint(bundle_dir: Path, towers: dict[str, Tower]) -> str:
    """sha256 over each tower's ONNX and preprocessing files (tokenizer) and its canonical preprocessing config."""
    h = hashlib.sha256()
    for modality in sorted(towers):
        tower = towers[modality]
        h.update(modality.encode())
        h.update(json.dumps(tower.model_dump(), sort_keys=True).encode())
        for rel in (tower.onnx, *tower.preprocessing.files):
            sha256_file(bundle_dir / rel, h)
    return h.hexdigest()


def copy_tower(source_bundle: Path, tower: Tower, dest: Path) -> None:
    """A tower's ONNX file and preprocessing files (tokenizer) from ``source_bundle`` into folder ``dest``."""
    for rel in (tower.onnx, *tower.preprocessing.files):
        shutil.copyfile(source_bundle / rel, dest / rel)


def publish_bundle(
    tmp: Path,
    models_dir: Path,
    *,
    name: str,
    version: str,
    dim: int,
    towers: dict[str, Tower],
    source: dict,
    parity: dict,
) -> ModelManifest:
    """The last step of every bundle writer: fingerprint the towers staged in ``tmp``, write the manifest, and move
    the folder into ``<models_dir>/<name>`` atomically. No torch (the exporters add their versions to ``source``)."""
    manifest = ModelManifest(
        name=name,
        version=version,
        fingerprint=compute_fingerprint(tmp, towers),
        dim=dim,
        towers=towers,
        source=source,
        parity=parity,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    atomic_write_json(tmp / MANIFEST, manifest.model_dump())
    replace_dir(tmp, models_dir / name)
    return manifest


def load_manifest(bundle_dir: Path) -> ModelManifest:
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise ModelNotFound(f"no model bundle at {bundle_dir} (missing {MANIFEST}); run `xmodal models prepare`")
    try:
        return ModelManifest.model_validate(read_json(path))
    except (ValidationError, ValueError) as exc:
        raise BundleError(f"{path} is not a valid model manifest: {exc}") from exc


def verify_bundle(bundle_dir: Path) -> ModelManifest:
    """Load the manifest and check every file is there and hashes to the recorded fingerprint."""
    manifest = load_manifest(bundle_dir)
    for tower in manifest.towers.values():
        for rel in (tower.onnx, *tower.preprocessing.files):
            if not (bundle_dir / rel).is_file():
                raise BundleError(f"model bundle {bundle_dir} lacks {rel}")
    actual = compute_fingerprint(bundle_dir, manifest.towers)
    if actual != manifest.fingerprint:
        raise FingerprintMismatch(
            f"model bundle {bundle_dir} is corrupt: its files hash to {actual[:12]}, "
            f"the manifest says {manifest.fingerprint[:12]}; rebuild it with `xmodal models prepare --force`"
        )
    return manifest


def list_bundles(models_dir: Path) -> list[ModelManifest]:
    if not models_dir.is_dir():
        return []
    out = []
    for child in sorted(models_dir.iterdir()):
        if child.is_dir() and not child.name.startswith(".") and (child / MANIFEST).is_file():
            out.append(load_manifest(child))
    return out


def find_bundle(models_dir: Path, name: str, fingerprint: str) -> Path:
    """The bundle folder whose manifest has ``fingerprint``: the folder called ``name`` first, then any other.
    ModelNotFound when none has it (a retrained bundle under the same name is another model)."""
    others = sorted(p for p in models_dir.iterdir() if p.is_dir() and p.name != name) if models_dir.is_dir() else []
    for folder in [models_dir / name, *others]:
        try:
            if load_manifest(folder).fingerprint == fingerprint:
                return folder
        except (XmodalError, OSError):
            continue  # not a bundle, or a damaged one: not this model
    raise ModelNotFound(f"no model bundle in {models_dir} has the fingerprint of {name} ({fingerprint[:12]})")
