"""Adding, deleting and compacting with the service's settings (model, device, versions kept, segments allowed):
the one place the `xmodal index add|delete|compact` commands and the jobs behind the HTTP routes both call.
Announcing the new version is the caller's (the CLI says to how many replicas; a job records it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from indexer.layout import VersionManifest
from service.settings import Settings

if TYPE_CHECKING:
    from indexer.encode import Engine
    from models.adapter import AdapterManifest
    from models.encoder import Encoder

ENGINES = ("local", "ray")


def add_corpus(
    settings: Settings,
    name: str,
    corpus: Path,
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = 32,
    engine: Engine | None = None,
    memory_budget: int | None = None,
) -> VersionManifest:
    """Encode a corpus's items into a new segment of ``name`` (upserts; tiered compaction past max_segments), its
    index chosen within ``memory_budget`` (bytes; default XMODAL_INDEX_MEMORY_GB)."""
    from indexer.build import add_items
    from indexer.corpus import read_corpus

    items = read_corpus(corpus)
    return add_items(
        indexes_dir=settings.indexes_dir,
        name=name,
        items=items,
        encoder=index_encoder(settings, name),
        batch_size=batch_size,
        use_gpu=settings.device != "cpu",
        progress=progress,
        keep_versions=settings.keep_versions,
        max_segments=settings.max_segments,
        engine=engine,
        memory_budget=memory_budget if memory_budget is not None else settings.index_memory_bytes,
    )


def encode_engine(
    settings: Settings, engine: str = "local", ray_address: str | None = None, ray_actors: int | None = None
) -> Engine:
    """The engine that encodes a build or an add: ``local`` (this process) or ``ray`` (Ray Data: a local Ray, or
    the cluster at ``ray_address``, with ``ray_actors`` actors). Ray's options are refused with another engine
    rather than ignored."""
    from models.errors import InvalidInput

    if engine not in ENGINES:
        raise InvalidInput(f"unknown engine {engine!r}: one of {', '.join(ENGINES)}")
    if engine == "local":
        if ray_address is not None or ray_actors is not None:
            raise InvalidInput("--ray-address and --ray-actors go with --engine ray")
        from indexer.encode import LocalEngine

        return LocalEngine()
    from indexer.ray_engine import RayEngine

    return RayEngine(address=ray_address, actors=ray_actors, device=settings.device)


def index_encoder(settings: Settings, name: str, model: str | None = None) -> Encoder:
    """The encoder of bundle ``model`` if given, else of the model ``name`` was built with (found among the bundles
    by its fingerprint), so that a service serving several models adds to and rebuilds each index with its own;
    XMODAL_MODEL for a new index."""
    from indexer.layout import IndexDir
    from models.bundle import find_bundle
    from models.encoder import Encoder

    index = IndexDir(settings.indexes_dir, name)
    if model is not None:
        return Encoder(settings.all_models_dir / model, device=settings.device, threads=settings.threads)
    if not index.exists():
        return Encoder(settings.model_dir, device=settings.device, threads=settings.threads)
    ref = index.manifest().model
    bundle = find_bundle(settings.all_models_dir, ref.name, ref.fingerprint)
    return Encoder(bundle, device=settings.device, threads=settings.threads)


def delete_ids(settings: Settings, name: str, ids: list[str]) -> tuple[VersionManifest, list[str]]:
    """Tombstone ``ids``; (the version, the ids the index did not hold)."""
    from indexer.lifecycle import delete_items

    return delete_items(settings.indexes_dir, name, ids, keep_versions=settings.keep_versions)


def compact_index(settings: Settings, name: str, memory_budget: int | None = None) -> VersionManifest:
    """Merge every segment of ``name`` into one, deleted rows dropped, its index chosen within ``memory_budget``
    (bytes; default XMODAL_INDEX_MEMORY_GB)."""
    from indexer.lifecycle import compact

    return compact(
        settings.indexes_dir,
        name,
        use_gpu=settings.device != "cpu",
        keep_versions=settings.keep_versions,
        memory_budget=memory_budget if memory_budget is not None else settings.index_memory_bytes,
    )


def upgrade_index(
    settings: Settings,
    name: str,
    model: str,
    adapter: str | None = None,
    fit: Callable[[VersionManifest, Encoder], AdapterManifest] | None = None,
    backfill: bool = True,
    progress: Callable[[int, int], None] | None = None,
    on_version: Callable[[VersionManifest], None] = lambda _v: None,
    batch_size: int = 32,
) -> VersionManifest:
    """Move ``name`` to bundle ``model`` (NEW) without re-encoding first: publish the version that serves its queries
    with NEW through an adapter to its current model (adapter bundle ``adapter``; else one found by the two models'
    fingerprints; else ``fit``'s), then, with ``backfill``, re-encode
    its OLD segments with NEW one by one. Run again, it resumes the backfill. ``on_version`` hears of each version
    published."""
    from indexer.layout import IndexDir, ModelRef
    from indexer.upgrade import backfill as run_backfill
    from indexer.upgrade import start_upgrade
    from models.encoder import Encoder

    new = Encoder(settings.all_models_dir / model, device=settings.device, threads=settings.threads)
    index = IndexDir(settings.indexes_dir, name)
    current = index.manifest()
    if current.upgrade is None and current.model.fingerprint == new.fingerprint:
        return current  # done already (e.g. a job retried after its last version was published)
    if current.upgrade is None or current.model.fingerprint != new.fingerprint:
        fit_now = (lambda: fit(current, new)) if fit is not None else None  # noqa: E731 - current is this one
        chosen = adapter_for(settings, current, new.fingerprint, model, adapter, fit_now)
        ref = ModelRef(name=new.name, fingerprint=new.fingerprint, dim=new.dim)
        current = start_upgrade(settings.indexes_dir, name, ref, chosen, keep_versions=settings.keep_versions)
        on_version(current)
    if not backfill:
        return current
    return run_backfill(
        settings.indexes_dir,
        name,
        new,
        batch_size=batch_size,
        use_gpu=settings.device != "cpu",
        progress=progress,
        keep_versions=settings.keep_versions,
        on_version=on_version,
        memory_budget=settings.index_memory_bytes,
    )


def adapter_for(
    settings: Settings,
    current: VersionManifest,
    new_fingerprint: str,
    new_bundle: str,
    adapter: str | None,
    fit: Callable[[], AdapterManifest] | None = None,
) -> AdapterManifest:
    """The adapter bundle named, else the newest from NEW to the index's model, else ``fit``'s (the CLI fits one on
    the index's own texts: service.adapter_fit; the service's jobs never write ONNX graphs). ModelNotFound, saying
    how to make one, when there is none."""
    from models.adapter import adapter_dir, find_adapter, load_adapter_manifest
    from models.errors import ModelNotFound

    models_dir = settings.all_models_dir
    if adapter is not None:
        return load_adapter_manifest(adapter_dir(models_dir, adapter))
    try:
        return load_adapter_manifest(find_adapter(models_dir, new_fingerprint, current.model.fingerprint))
    except ModelNotFound as exc:
        if fit is None:
            raise ModelNotFound(
                f"{exc.message}, or let `xmodal index upgrade {current.name} --to {new_bundle}` fit one on the "
                "index's own texts"
            ) from None
    return fit()
