"""The models and indexes the service holds, behind one lock.

Each model is loaded once, by fingerprint: the ones configured (``XMODAL_MODELS``, else ``XMODAL_MODEL``) at start,
and, unless ``XMODAL_MODELS`` lists the only ones to load, every model a published index was built with, found in
the models folder by its fingerprint. An index is served with its own model only: a version whose model no bundle
matches exactly is refused with the reason, and the version already loaded keeps serving.

Index versions are swapped by replacing a dict entry, so a request that already holds a LoadedIndex finishes on it.

Readers see a ``Served`` snapshot: loading and refreshing (in threads, under the lock) change private dicts and then
publish a new snapshot, copied under the lock; a published one never changes. So the event loop reads models,
indexes and errors that belong together (readiness, /v1/models) while a refresh runs, without waiting for the lock,
which a refresh holds for as long as an index takes to load.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from indexer.layout import IndexDir, ModelRef, VersionManifest, list_indexes
from indexer.search import LoadedIndex
from models.adapter import Adapter, adapter_dir, find_adapter, load_adapter
from models.bundle import find_bundle, load_manifest
from models.encoder import Encoder
from models.errors import FingerprintMismatch, IndexNotFound, ModelNotFound, XmodalError
from service.errors import NotReady
from service.query_encoder import QueryEncoder
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    """What the registry serves at one moment. Published whole and never changed afterwards: read it freely."""

    models: dict[str, QueryEncoder] = field(default_factory=dict)  # by fingerprint
    model_errors: dict[str, str] = field(default_factory=dict)  # configured bundle name -> why it is not loaded
    indexes: dict[str, LoadedIndex] = field(default_factory=dict)
    index_errors: dict[str, str] = field(default_factory=dict)  # published index -> why its version is refused
    default: str | None = None  # the fingerprint of the first configured model, once loaded

    def ready(self) -> bool:
        """Every configured model is loaded and every published index has a version being served (a refused new
        version while an older one serves is degraded, not unready)."""
        return (
            not self.model_errors
            and self.default is not None
            and all(name in self.indexes for name in self.index_errors)
        )

    def model_ids(self) -> dict[str, str]:
        """Each loaded model's public id: its name, or name@fingerprint-prefix where two share a name."""
        names = [q.name for q in self.models.values()]
        return {fp: q.name if names.count(q.name) == 1 else f"{q.name}@{fp[:12]}" for fp, q in self.models.items()}

    @property
    def model_error(self) -> str | None:
        """Why a configured model is not loaded (the first such), for /readyz and 503 messages."""
        return next(iter(self.model_errors.values()), None)


class Registry:
    def __init__(
        self,
        settings: Settings,
        make_queries: Callable[[Encoder], QueryEncoder],
        on_index: Callable[[LoadedIndex], None] = lambda _index: None,
    ) -> None:
        self.settings = settings
        self._make_queries = make_queries
        self._on_index = on_index
        # Changed under the lock only, then published as ``served`` (see Served).
        self._models: dict[str, QueryEncoder] = {}
        self._model_errors: dict[str, str] = {}
        self._indexes: dict[str, LoadedIndex] = {}
        self._index_errors: dict[str, str] = {}
        self._default: str | None = None
        self.adapters: dict[str, Adapter] = {}  # by fingerprint: projections of upgrading indexes (issue 16)
        self._lock = threading.RLock()  # the watcher, job completions and announcements all refresh
        self.served = Served()

    def _publish(self) -> None:
        """A new snapshot of what is served, copied under the lock (readers keep the one they hold)."""
        with self._lock:
            self.served = Served(
                dict(self._models),
                dict(self._model_errors),
                dict(self._indexes),
                dict(self._index_errors),
                self._default,
            )

    # --- the published snapshot, read ----------------------------------------------------------
    @property
    def indexes(self) -> dict[str, LoadedIndex]:
        return self.served.indexes

    @property
    def index_errors(self) -> dict[str, str]:
        return self.served.index_errors

    # --- loading -------------------------------------------------------------------------------
    @property
    def configured(self) -> list[str]:
        return self.settings.model_list or [self.settings.model]

    def load_models(self) -> None:
        """Load the configured bundles; one that fails is listed with the reason (the others still load)."""
        for name in self.configured:
            with self._lock:
                try:
                    queries = self._load(self.settings.all_models_dir / name)
                    self._model_errors.pop(name, None)
                    if self._default is None:
                        self._default = queries.fingerprint
                except XmodalError as exc:
                    self._model_errors[name] = exc.message
                    log.error("model %s not loaded: %s", name, exc.message)
                self._publish()

    def _load(self, bundle_dir: Path) -> QueryEncoder:
        with self._lock:
            known = self._models.get(load_manifest(bundle_dir).fingerprint)  # the manifest only: no sessions twice
            if known is not None:
                return known
            s = self.settings
            # checks the fingerprint of its files
            encoder = Encoder(bundle_dir, device=s.device, threads=s.threads, spinning=s.ort_spinning)
            if "text" in encoder.modalities:
                encoder.encode_text(["warm up"])  # the first run allocates; keep it off the first request
            queries = self._make_queries(encoder)
            self._models[encoder.fingerprint] = queries
            self._publish()
            log.info("model %s (%s) loaded from %s", encoder.name, encoder.fingerprint[:12], bundle_dir)
            return queries

    def _model_of(self, name: str, version: str, ref: ModelRef) -> QueryEncoder:
        """The loaded model with exactly ``ref``'s fingerprint, loading its bundle when that is allowed."""
        if ref.fingerprint in self._models:
            return self._models[ref.fingerprint]
        built = f"index {name!r} version {version} was built with model {ref.name} ({ref.fingerprint[:12]})"
        if self.settings.model_list:
            loaded = ", ".join(f"{q.name} ({q.fingerprint[:12]})" for q in self._models.values()) or "none"
            raise FingerprintMismatch(f"{built}, which XMODAL_MODELS does not list; loaded: {loaded}")
        return self._load(self._bundle_of(ref, built))

    def _bundle_of(self, ref: ModelRef, built: str) -> Path:
        try:
            return find_bundle(self.settings.all_models_dir, ref.name, ref.fingerprint)
        except ModelNotFound as exc:
            raise ModelNotFound(
                f"{built}; {exc.message}: prepare or export that model, or rebuild the index with a model this "
                "service has"
            ) from None

    def _adapter_of(self, name: str, manifest: VersionManifest) -> Adapter:
        """The adapter an upgrading version names (by name, else any with the same from/to models), loaded once by
        fingerprint; the version's segments check it is exactly the one named (indexer.search)."""
        upgrade = manifest.upgrade
        if upgrade.adapter_fingerprint in self.adapters:
            return self.adapters[upgrade.adapter_fingerprint]
        new, old = manifest.model.fingerprint, upgrade.from_model.fingerprint
        folder = adapter_dir(self.settings.all_models_dir, upgrade.adapter)
        if not (folder / "manifest.json").is_file():
            try:
                folder = find_adapter(self.settings.all_models_dir, new, old)
            except ModelNotFound as exc:
                raise ModelNotFound(
                    f"index {name!r} version {manifest.version} is being upgraded from {upgrade.from_model.name} to "
                    f"{manifest.model.name} and needs adapter {upgrade.adapter}; {exc.message}"
                ) from None
        adapter = load_adapter(folder, new, old, device=self.settings.device)
        self.adapters[adapter.fingerprint] = adapter
        log.info("adapter %s (%s) loaded: %s -> %s", upgrade.adapter, adapter.fingerprint[:12], new[:12], old[:12])
        return adapter

    def refresh(self) -> None:
        """Load indexes whose published version changed. A version that cannot be served (a damaged file, a model
        no bundle matches, an unreadable manifest) is refused and listed with the reason, once in the log; the
        version already loaded keeps serving; other indexes are not held up by it. The reason is forgotten once the
        index is served again, or is no longer published (its folder removed)."""
        with self._lock:
            published = list_indexes(self.settings.indexes_dir)
            for name in published:
                try:
                    self._refresh_one(name)
                except Exception as exc:  # noqa: BLE001 - whatever one index does, the others keep swapping
                    message = exc.message if isinstance(exc, XmodalError) else f"{type(exc).__name__}: {exc}"
                    if self._index_errors.get(name) != message:
                        if isinstance(exc, XmodalError):
                            log.error("index %s not loaded: %s", name, message)
                        else:
                            log.exception("index %s not loaded", name)
                    self._index_errors[name] = message
                self._publish()  # each index as soon as it is loaded (or refused), not after all of them
            for name in set(self._index_errors) - set(published):
                del self._index_errors[name]
            self._publish()

    def _refresh_one(self, name: str) -> None:
        d = IndexDir(self.settings.indexes_dir, name)
        version = d.current()
        old = self._indexes.get(name)
        if old is not None and old.version == version:
            self._index_errors.pop(name, None)  # e.g. rolled back to the version being served
            return
        manifest = d.manifest(version)
        queries = self._model_of(name, version, manifest.model)
        loaded = LoadedIndex(
            self.settings.indexes_dir,
            name,
            version,
            use_gpu=self.settings.device != "cpu",
            expect_fingerprint=queries.fingerprint,
            verify=self.settings.verify_checksums,
            previous=old,  # its segments are immutable: the new version shares them, loaded and checked once
            adapter=self._adapter_of(name, manifest) if manifest.upgrade else None,
        )
        self._indexes[name] = loaded
        self._index_errors.pop(name, None)
        self._on_index(loaded)
        log.info(
            "serving index %s version %s (%d items, model %s)%s",
            name,
            loaded.version,
            loaded.size,
            queries.name,
            f", replacing {old.version}" if old else "",
        )

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval_s)
            try:
                await run_in_threadpool(self.refresh)
            except Exception:  # never let the watcher die
                log.exception("index refresh failed")

    def close(self) -> None:
        with self._lock:
            for queries in self._models.values():
                queries.close()
            for index in self._indexes.values():
                index.close()

    # --- serving: each answer from one snapshot ------------------------------------------------
    def index(self, name: str) -> LoadedIndex:
        served = self.served
        loaded = served.indexes.get(name)
        if loaded is None:
            if name in served.index_errors:
                raise NotReady(f"index {name!r} cannot be served: {served.index_errors[name]}")
            if served.default is None and not served.indexes:
                raise NotReady(f"the model is not loaded: {served.model_error or 'still starting'}")
            raise IndexNotFound(f"no index named {name!r}; available: {sorted(served.indexes)}")
        return loaded

    def queries_for(self, index: LoadedIndex) -> QueryEncoder:
        """The query encoder of the model ``index`` was built with (loaded before the index was)."""
        return self.served.models[index.manifest.model.fingerprint]

    def encoder_for(self, index: LoadedIndex) -> Encoder:
        return self.queries_for(index).encoder

    def model(self, wanted: str | None) -> QueryEncoder:
        """A loaded model by its id (see ``model_ids``) or fingerprint; the default one for None."""
        served = self.served
        if wanted is None:
            if served.default is None:
                raise NotReady(f"the model is not loaded: {served.model_error or 'still starting'}")
            return served.models[served.default]
        ids = served.model_ids()
        for fingerprint, queries in served.models.items():
            if wanted in (ids[fingerprint], fingerprint):
                return queries
        if not served.models:
            raise NotReady(f"model {wanted!r} is not loaded: {served.model_error or 'still starting'}")
        raise ModelNotFound(f"model {wanted!r} is not loaded; loaded: {sorted(ids.values())}", param="model")

    def model_ids(self) -> dict[str, str]:
        return self.served.model_ids()
