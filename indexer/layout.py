"""The index bundle on disk: ``<indexes>/<name>/{CURRENT, versions/<version>/...}``.

A version is written into a staging folder, fsynced and renamed into ``versions/``; ``CURRENT`` is
replaced last (os.replace), so a reader sees the old version or the new one, never half of one.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.errors import BundleError, IndexNotFound, InvalidInput
from models.files import atomic_write_bytes, read_json

FORMAT = "xmodal.index/1"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MANIFEST = "manifest.json"
DENSE = "dense.faiss"
ITEMS = "items.sqlite"
TOKENS = "tokens"  # a folder: the token store for late interaction (indexer.tokens)


class IndexManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: str = FORMAT
    name: str
    version: str
    created_at: str
    model: dict = Field(description="name, fingerprint and dim of the model that encoded the items")
    dim: int
    faiss: dict = Field(description="factory key, metric and search params")
    counts: dict[str, int] = Field(description="items by modality")
    recall_at_10: dict = Field(description="recall@10 of the FAISS index against exact search, on a sample")
    rows: dict[str, list[int]] = Field(default_factory=dict, description="[start, end) of each modality's rows")
    calibration: dict = Field(
        default_factory=dict, description="'q->t': mean/std of top-10 scores of modality-q queries among t items"
    )
    score_calibration: dict | None = Field(
        None,
        description="per 'q->t' pair: the maps of a cosine to a score comparable across modalities (platt, isotonic, "
        "centred), fitted on the index's own multimodal items, with their held-out quality; the duplicate threshold "
        "(indexer.calibration). None: built before them; searches fall back to the z-scores",
    )
    tokens: dict | None = Field(
        None,
        description="the token store for late interaction (None: dense only): its meta, and the recall its "
        "compression, pooling and fast path cost, measured at build time",
    )
    build: dict = Field(default_factory=dict)
    files: dict[str, str] = Field(description="what each file is")
    checksums: dict[str, str] = Field(
        default_factory=dict,
        description="sha256 of every file of the version (tokens/ files by their path), checked before it is served; "
        "empty in versions built before checksums were written",
    )


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidInput(
            f"invalid index name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return name


def new_version_name() -> str:
    """Sortable by time to the millisecond (two builds in one second still list in order), unique across
    concurrent builds."""
    now = dt.datetime.now(dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}-" + secrets.token_hex(3)


class IndexDir:
    def __init__(self, indexes_dir: Path, name: str) -> None:
        self.name = check_name(name)
        self.root = indexes_dir / name
        self.versions_dir = self.root / "versions"

    def exists(self) -> bool:
        return (self.root / "CURRENT").is_file()

    def current(self) -> str:
        try:
            version = (self.root / "CURRENT").read_text().strip()
        except FileNotFoundError:
            raise IndexNotFound(f"index {self.name!r} does not exist or has no published version") from None
        if not (self.versions_dir / version).is_dir():
            raise BundleError(f"index {self.name!r}: CURRENT names version {version!r}, which is missing")
        return version

    def versions(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        return sorted(p.name for p in self.versions_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def version_dir(self, version: str) -> Path:
        path = self.versions_dir / version
        if version.startswith(".") or not (path / MANIFEST).is_file():
            raise IndexNotFound(f"index {self.name!r} has no version {version!r}; it has {self.versions()}")
        return path

    def manifest(self, version: str | None = None) -> IndexManifest:
        """The manifest of ``version`` (default: the published one). A version is the folder it is in: a
        manifest that names another index or version (a copied folder) is refused."""
        version = version or self.current()
        path = self.version_dir(version) / MANIFEST
        try:
            manifest = IndexManifest.model_validate(read_json(path))
        except (ValidationError, ValueError) as exc:
            raise BundleError(f"{path} is not a valid index manifest: {exc}") from exc
        if (manifest.name, manifest.version) != (self.name, version):
            raise BundleError(
                f"index {self.name!r} version {version}: its manifest describes index {manifest.name!r} version "
                f"{manifest.version} (a copied or moved folder); rebuild it, or publish the version it describes"
            )
        return manifest

    def publish(self, version: str) -> None:
        self.version_dir(version)  # refuses unknown or staging versions
        atomic_write_bytes(self.root / "CURRENT", (version + "\n").encode())

    def prune(self, keep: int) -> list[str]:
        """Remove all but the newest ``keep`` versions, never the published one; returns the removed names. A
        service still serving a removed version keeps its open files (POSIX) until it swaps."""
        if keep < 1:
            raise InvalidInput(f"keep at least one version, not {keep}")
        current = self.current() if self.exists() else None
        old = [v for v in self.versions()[:-keep] if v != current]
        for version in old:
            aside = self.versions_dir / f".old-{version}-pid{os.getpid()}-"
            os.replace(self.versions_dir / version, aside)  # unlisted at once; a crash leaves it to remove_stale
            shutil.rmtree(aside, ignore_errors=True)
        return old


def list_indexes(indexes_dir: Path) -> list[str]:
    if not indexes_dir.is_dir():
        return []
    return sorted(p.name for p in indexes_dir.iterdir() if NAME_RE.match(p.name) and (p / "CURRENT").is_file())
