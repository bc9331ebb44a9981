"""The index bundle on disk: ``<indexes>/<name>/{CURRENT, versions/<version>.json, segments/<segment>/...}``.

A segment is an immutable batch of items (items store, one FAISS index per modality, token store, calibration,
a sha256 per file); a version is a JSON list of segments, each with a tombstone set (its deleted rows). Adding
items writes a new segment and a version that lists it; deleting writes a version with more tombstones; versions
share segments by reference. A segment is written into a staging folder, fsynced and renamed into
``segments/``; a version file is written atomically; ``CURRENT`` is replaced last (os.replace), so a reader
sees the old version or the new one, never half of one. Writers of one index take its lock
(:meth:`IndexDir.writing`), so two adds never base on the same version and the garbage collection of
unreferenced segments never races a writer.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.errors import BundleError, IndexNotFound, InvalidInput
from models.files import atomic_write_bytes, atomic_write_json, read_json

FORMAT = "xmodal.index/2"
SEGMENT_FORMAT = "xmodal.segment/1"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MANIFEST = "manifest.json"
ITEMS = "items.sqlite"
TOKENS = "tokens"  # a folder: the token store for late interaction (indexer.late.store)


def dense_file(modality: str) -> str:
    """A segment's FAISS index of one modality's rows (FAISS id i = that modality's i-th row)."""
    return f"dense.{modality}.faiss"


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    fingerprint: str
    dim: int


class FaissInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str = Field(description="FAISS factory key of every modality's index")
    metric: str = "inner_product"
    params: dict = Field(default_factory=dict, description="search parameters (nprobe, efSearch)")
    built_on: str = Field("cpu", description="where the indexes were built: gpu, cpu, or mixed (per modality below)")
    placement: dict = Field(
        default_factory=dict,
        description="per modality: the device its index was built on and why (indexer.gpu.Placement: device, reason, "
        "gpus, float16_lookup)",
    )
    choice: dict = Field(
        default_factory=dict,
        description="how the key was chosen (indexer.index_choice): n, dim, budget_bytes, estimated_bytes, reason, "
        "nlist, train_sample, ondisk, mapped_bytes; build_seconds and tune_seconds of the FAISS part",
    )
    ondisk: bool = Field(
        False,
        description="IVF-PQ on disk (indexer.ondisk): each modality's inverted lists in dense.<modality>.ivfdata and "
        "its re-ranking SQ8 codes in dense.<modality>.refine.faiss, memory-mapped for search",
    )


class Upgrade(BaseModel):
    """A model upgrade in progress (issue 16): the version's ``model`` (NEW) encodes the queries; segments still
    encoded by ``from_model`` (OLD) are searched with NEW's queries projected into OLD's space by the adapter whose
    from/to fingerprints are exactly NEW's and OLD's, their scores mapped onto NEW's scale by ``score_map``."""

    model_config = ConfigDict(extra="forbid")
    from_model: ModelRef = Field(description="OLD: the model the segments not yet backfilled were encoded by")
    from_version: str | None = Field(None, description="the version published before the switch: kept, to roll back to")
    adapter: str = Field(description="the adapter bundle's name (<models>/adapters/<name>)")
    adapter_fingerprint: str
    score_map: dict = Field(
        default_factory=dict, description="slope, intercept: OLD-space score of a projected query -> NEW's scale"
    )
    started_at: str


class SegmentManifest(BaseModel):
    """``segments/<id>/manifest.json``: what one immutable batch of items holds."""

    model_config = ConfigDict(extra="forbid")
    format: str = SEGMENT_FORMAT
    index: str
    id: str
    created_at: str
    model: ModelRef
    dim: int
    faiss: FaissInfo
    counts: dict[str, int] = Field(description="rows by modality")
    rows: dict[str, list[int]] = Field(description="[start, end) of each modality's rows in the items store")
    recall_at_10: dict = Field(
        description="recall@10 of the FAISS indexes against exact search on the tuning sample; ``heldout``: on the "
        "held-out sample whose exact answers are kept in heldout/ (indexer.heldout)"
    )
    calibration: dict = Field(default_factory=dict, description="'q->t': mean/std of top-10 scores (z-scores)")
    score_calibration: dict | None = Field(None, description="per 'q->t' pair: fitted score maps (indexer.calibration)")
    tokens: dict | None = Field(None, description="the token store for late interaction (None: dense only)")
    build: dict = Field(default_factory=dict)
    files: dict[str, str] = Field(description="what each file is")
    checksums: dict[str, str] = Field(description="sha256 of every file of the segment, checked before it is served")

    @property
    def size(self) -> int:
        return sum(self.counts.values())


class SegmentRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    rows: int = Field(description="rows the segment holds, deleted ones included")
    tombstones: list[int] = Field(default_factory=list, description="the segment's deleted rows, sorted")


class VersionManifest(BaseModel):
    """``versions/<version>.json``: the segments that make a version, and what it was made by."""

    model_config = ConfigDict(extra="forbid")
    format: str = FORMAT
    name: str
    version: str
    created_at: str
    base: str | None = Field(None, description="the version this one was made from (None: a full build)")
    operation: str = Field(description="build, add, delete or compact")
    model: ModelRef
    dim: int
    segments: list[SegmentRef]
    counts: dict[str, int] = Field(description="live (not deleted) rows by modality")
    faiss: FaissInfo = Field(description="the largest segment's FAISS settings")
    recall_at_10: dict = Field(description="the largest segment's recall@10 against exact search")
    calibration: dict = Field(default_factory=dict, description="the largest segment's z-score statistics")
    score_calibration: dict | None = Field(None, description="the largest segment's fitted score maps")
    tokens: dict | None = Field(None, description="the largest segment's token store summary (None: dense only)")
    build: dict = Field(default_factory=dict, description="what the operation did (items encoded, deleted, seconds)")
    upgrade: Upgrade | None = Field(None, description="a model upgrade in progress (segments of two models)")


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidInput(
            f"invalid index name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return name


def new_version_name() -> str:
    """Sortable by time to the millisecond (two builds in one second still list in order), unique across
    concurrent builds. Segments are named the same way."""
    now = dt.datetime.now(dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}-" + secrets.token_hex(3)


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class IndexDir:
    def __init__(self, indexes_dir: Path, name: str) -> None:
        self.name = check_name(name)
        self.root = indexes_dir / name
        self.versions_dir = self.root / "versions"
        self.segments_dir = self.root / "segments"

    def exists(self) -> bool:
        return (self.root / "CURRENT").is_file()

    def current(self) -> str:
        try:
            version = (self.root / "CURRENT").read_text().strip()
        except FileNotFoundError:
            raise IndexNotFound(f"index {self.name!r} does not exist or has no published version") from None
        self.version_path(version)
        return version

    def versions(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        return sorted(p.stem for p in self.versions_dir.iterdir() if p.suffix == ".json" and not p.name.startswith("."))

    def version_path(self, version: str) -> Path:
        path = self.versions_dir / f"{version}.json"
        if version.startswith(".") or "/" in version or not path.is_file():
            if (self.versions_dir / version / MANIFEST).is_file():
                raise BundleError(
                    f"index {self.name!r} version {version} is in the layout before segments (a folder per version); "
                    f"rebuild the index with `xmodal index build {self.name} --corpus ...`"
                )
            raise IndexNotFound(f"index {self.name!r} has no version {version!r}; it has {self.versions()}")
        return path

    def manifest(self, version: str | None = None) -> VersionManifest:
        """The manifest of ``version`` (default: the published one). A version is the file it is in: a manifest
        that names another index or version (a copied file) is refused."""
        version = version or self.current()
        path = self.version_path(version)
        manifest = _validated(VersionManifest, path)
        if (manifest.name, manifest.version) != (self.name, version):
            raise BundleError(
                f"index {self.name!r} version {version}: its manifest describes index {manifest.name!r} version "
                f"{manifest.version} (a copied or moved file); rebuild it, or publish the version it describes"
            )
        return manifest

    def segment_dir(self, segment: str) -> Path:
        return self.segments_dir / segment

    def segment_manifest(self, segment: str) -> SegmentManifest:
        """A segment's manifest; refused when the folder is missing or holds another index's or segment's files."""
        path = self.segment_dir(segment) / MANIFEST
        if segment.startswith(".") or "/" in segment or not path.is_file():
            raise BundleError(f"segment {segment} is missing")
        manifest = _validated(SegmentManifest, path)
        if (manifest.index, manifest.id) != (self.name, segment):
            raise BundleError(
                f"segment {segment}: its manifest describes index {manifest.index!r} segment "
                f"{manifest.id} (a copied or moved folder)"
            )
        return manifest

    def write_version(self, manifest: VersionManifest) -> None:
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.versions_dir / f"{manifest.version}.json", manifest.model_dump())

    def publish(self, version: str) -> None:
        self.version_path(version)  # refuses unknown versions
        atomic_write_bytes(self.root / "CURRENT", (version + "\n").encode())

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """The index's writer lock (an flock, released by the kernel when a writer dies): adds, deletes,
        compactions, publishing and garbage collection of one index run one at a time."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def prune(self, keep: int) -> list[str]:
        """Remove all but the newest ``keep`` versions (never the published one, nor during a model upgrade the
        version it started from), then the segments no remaining version lists; returns the removed versions. Call it
        holding :meth:`writing`. A service still serving a removed version keeps its open files (POSIX) until it
        swaps."""
        if keep < 1:
            raise InvalidInput(f"keep at least one version, not {keep}")
        current = self.current() if self.exists() else None
        kept = {current}
        if current is not None:  # during a model upgrade, the version before it too: the way back
            try:
                upgrade = self.manifest(current).upgrade
            except BundleError:
                upgrade = None
            if upgrade is not None:
                kept.add(upgrade.from_version)
        old = [v for v in self.versions()[:-keep] if v not in kept]
        for version in old:
            (self.versions_dir / f"{version}.json").unlink(missing_ok=True)
        for path in self.versions_dir.iterdir() if self.versions_dir.is_dir() else []:
            if path.is_dir() and not path.name.startswith(".") and path.name != current:
                shutil.rmtree(path, ignore_errors=True)  # a version folder of the layout before segments
        used = set()
        for version in self.versions():
            try:
                used |= {s.id for s in self.manifest(version).segments}
            except (BundleError, IndexNotFound):
                continue  # a damaged version file keeps nothing alive
        if self.segments_dir.is_dir():
            for path in self.segments_dir.iterdir():
                if path.is_dir() and not path.name.startswith(".") and path.name not in used:
                    aside = self.segments_dir / f".old-{path.name}-pid{os.getpid()}-"
                    os.replace(path, aside)  # unlisted at once; a crash leaves it to remove_stale_staging
                    shutil.rmtree(aside, ignore_errors=True)
        return old


def _validated(model: type[BaseModel], path: Path):  # noqa: ANN202
    try:
        return model.model_validate(read_json(path))
    except (ValidationError, ValueError) as exc:
        raise BundleError(f"{path} is not a valid {model.__name__}: {exc}") from exc


def list_indexes(indexes_dir: Path) -> list[str]:
    if not indexes_dir.is_dir():
        return []
    return sorted(p.name for p in indexes_dir.iterdir() if NAME_RE.match(p.name) and (p / "CURRENT").is_file())
