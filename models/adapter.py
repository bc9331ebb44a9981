"""Adapter bundles: a projection from one model's embedding space to another's, so that a NEW model's queries can
search an index encoded by an OLD model (backward-compatible upgrades, issue 16).

``<models>/adapters/<name>/``: ``manifest.json`` (kind ``adapter``) and ``adapter.onnx``: input ``new_embedding``
[B, D_new] (what NEW's towers emit), output ``embedding`` [B, D_old], L2-normalised, the contract's name for a vector
in OLD's space (an ONNX graph cannot give its input and output one name). The manifest records NEW's and OLD's
fingerprints, the fit's data hash and method, and the quality measured on held-out texts. ``fingerprint`` is the
sha256 of ``adapter.onnx`` plus the canonical from/to entries: an adapter is used only between exactly those two
models (``load_adapter``). No torch here; written by ``models.align``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.errors import AdapterMismatch, BundleError, FingerprintMismatch, ModelNotFound
from models.files import read_json, sha256_file

ADAPTER_FORMAT = "xmodal.adapter/1"
ADAPTERS = "adapters"  # the folder below the models folder that holds adapter bundles
ONNX_FILE = "adapter.onnx"
INPUT = "new_embedding"
OUTPUT = "embedding"


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    fingerprint: str
    dim: int = Field(gt=0)


class AdapterManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["xmodal.adapter/1"] = ADAPTER_FORMAT
    kind: Literal["adapter"] = "adapter"
    name: str
    version: str = "1"
    fingerprint: str
    from_model: ModelRef = Field(description="NEW: the model whose embeddings go in")
    to_model: ModelRef = Field(description="OLD: the model whose space comes out")
    onnx: str = ONNX_FILE
    towers: dict[str, str] = Field(
        default_factory=dict,
        description="modality -> the ONNX map of that tower's queries (fitted with its media pairs); others use onnx",
    )
    input: str = INPUT
    output: str = OUTPUT
    method: Literal["procrustes", "lstsq"]
    fit: dict = Field(default_factory=dict, description="data (sources, counts, sha256), split, seed, candidates")
    quality: dict = Field(default_factory=dict, description="held-out figures of the shipped projection")
    score_map: dict = Field(
        default_factory=dict,
        description="slope, intercept: a projected query's cosine to an OLD vector -> the NEW-space cosine of the "
        "same pair (least squares over held-out pairs near the top), so OLD and NEW segments' hits merge on one scale",
    )
    created_at: str


def tower_onnx(modality: str) -> str:
    return f"adapter.{modality}.onnx"


def adapter_fingerprint(
    bundle_dir: Path, from_model: ModelRef, to_model: ModelRef, onnx: str = ONNX_FILE, towers: dict | None = None
) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"from": from_model.model_dump(), "to": to_model.model_dump()}, sort_keys=True).encode())
    sha256_file(bundle_dir / onnx, h)
    for modality in sorted(towers or {}):
        h.update(modality.encode())
        sha256_file(bundle_dir / towers[modality], h)
    return h.hexdigest()


def adapter_dir(models_dir: Path, name: str) -> Path:
    return models_dir / ADAPTERS / name


def load_adapter_manifest(bundle_dir: Path) -> AdapterManifest:
    path = bundle_dir / "manifest.json"
    if not path.is_file():
        raise ModelNotFound(f"no adapter bundle at {bundle_dir}; make one with `xmodal models align NEW --to OLD`")
    try:
        manifest = AdapterManifest.model_validate(read_json(path))
    except (ValidationError, ValueError) as exc:
        raise BundleError(f"{path} is not a valid adapter manifest: {exc}") from exc
    for onnx in (manifest.onnx, *manifest.towers.values()):
        if "/" in onnx or not (bundle_dir / onnx).is_file():
            raise BundleError(f"adapter bundle {bundle_dir} lacks {onnx}")
    actual = adapter_fingerprint(bundle_dir, manifest.from_model, manifest.to_model, manifest.onnx, manifest.towers)
    if actual != manifest.fingerprint:
        raise FingerprintMismatch(
            f"adapter bundle {bundle_dir} is corrupt: its files hash to {actual[:12]}, the manifest says "
            f"{manifest.fingerprint[:12]}; fit it again with `xmodal models align`"
        )
    return manifest


def find_adapter(models_dir: Path, from_fingerprint: str, to_fingerprint: str) -> Path:
    """The adapter bundle under ``<models_dir>/adapters`` that maps exactly NEW (``from_fingerprint``) to OLD
    (``to_fingerprint``): the newest such, by its manifest's creation time. ModelNotFound when there is none."""
    found = []
    root = models_dir / ADAPTERS
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name.startswith(".") or not (folder / "manifest.json").is_file():
            continue
        try:
            manifest = AdapterManifest.model_validate(read_json(folder / "manifest.json"))
        except (ValidationError, ValueError):
            continue  # a damaged adapter is no candidate; load_adapter says why when it is asked for by name
        if (manifest.from_model.fingerprint, manifest.to_model.fingerprint) == (from_fingerprint, to_fingerprint):
            found.append((manifest.created_at, folder))
    if not found:
        raise ModelNotFound(
            f"no adapter in {root} maps model {from_fingerprint[:12]} to {to_fingerprint[:12]}; fit one with "
            "`xmodal models align NEW --to OLD`"
        )
    return max(found)[1]


class Adapter:
    """A loaded adapter: ``project`` maps NEW's embeddings (or token vectors, [..., D_new]) into OLD's space, with the
    map of the query's tower (``modality``) where the adapter has one, else the text-fitted one."""

    def __init__(self, bundle_dir: Path, manifest: AdapterManifest, device: str = "cpu", threads: int = 0):
        from models.runtime import create_session

        self.bundle_dir, self.manifest = bundle_dir, manifest
        self.session, self.providers = create_session(bundle_dir / manifest.onnx, device=device, threads=threads)
        self.towers = {
            m: create_session(bundle_dir / f, device=device, threads=threads)[0] for m, f in manifest.towers.items()
        }

    @property
    def from_fingerprint(self) -> str:
        return self.manifest.from_model.fingerprint

    @property
    def to_fingerprint(self) -> str:
        return self.manifest.to_model.fingerprint

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    def project(self, vectors: np.ndarray, modality: str | None = None) -> np.ndarray:
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        flat = x.reshape(-1, x.shape[-1])
        session = self.towers.get(modality, self.session)
        out = session.run([self.manifest.output], {self.manifest.input: flat})[0]
        return out.reshape(*x.shape[:-1], out.shape[-1])


def load_adapter(bundle_dir: Path, from_fingerprint: str, to_fingerprint: str, device: str = "cpu") -> Adapter:
    """The adapter at ``bundle_dir``, after checking its files and that it maps exactly ``from_fingerprint`` (NEW)
    to ``to_fingerprint`` (OLD). AdapterMismatch otherwise: a projection fitted for other models is never used."""
    manifest = load_adapter_manifest(bundle_dir)
    for side, ref, wanted in (
        ("from", manifest.from_model, from_fingerprint),
        ("to", manifest.to_model, to_fingerprint),
    ):
        if ref.fingerprint != wanted:
            raise AdapterMismatch(
                f"adapter {manifest.name} maps {manifest.from_model.name} ({manifest.from_model.fingerprint[:12]}) to "
                f"{manifest.to_model.name} ({manifest.to_model.fingerprint[:12]}); its {side} model is not the one "
                f"asked for ({wanted[:12]})"
            )
    return Adapter(bundle_dir, manifest, device=device)
