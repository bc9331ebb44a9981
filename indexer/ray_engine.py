"""`--engine ray`: the chunks of a build (indexer.encode.plan_chunks) encoded over Ray Data, by a pool of actors
that each load the ONNX model once; a local Ray on this machine, or a cluster at ``address``. Every actor runs
``encode_chunk``, the local engine's own unit of work, so the vectors are the local engine's and everything around
the encoding (checkpoints and resume, failure records, segment writing, publishing) stays the build's, in this
process. Ray is imported here only, when a build asks for it (the optional extra ``ray``).

On a cluster every node needs this xmodal installed, and the model bundle and the corpus's media files at the same
absolute paths as here (a shared filesystem, or the same image with the same mounts): an actor refuses a bundle
whose fingerprint is not the driver's. Only the chunks' texts and paths travel, and each chunk's vectors back."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from indexer.corpus import CorpusItem
from indexer.encode import Chunk, encode_chunk
from indexer.shards import Shard, shard_from_bytes, shard_to_bytes
from models.encoder import Encoder
from models.errors import FingerprintMismatch, InvalidInput, MissingDependency

# A local Ray's shared-memory object store: chunks stream through it (a few MB each), so a modest one is plenty,
# and it is taken from /dev/shm, which containers keep small.
LOCAL_OBJECT_STORE_BYTES = 256 << 20


def import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise MissingDependency(
            "--engine ray needs Ray Data: pip install 'xmodal[ray]' (or 'ray[data]'), or use --engine local"
        ) from None
    return ray


class RayEngine:
    """Encodes chunks with ``actors`` Ray actors (default: one per CPU the cluster has), each reserving its share
    of the CPUs for its ONNX Runtime threads (and a GPU with ``device="cuda"``). With ``address`` (else
    ``$RAY_ADDRESS``), it joins that cluster; else it starts a local Ray for the build and stops it afterwards. A
    Ray already started in this process is used as it is and left running."""

    def __init__(self, address: str | None = None, actors: int | None = None, device: str = "auto") -> None:
        if actors is not None and actors < 1:
            raise InvalidInput(f"--ray-actors must be at least 1, not {actors}")
        import_ray()  # a missing extra is said before any work, not after the corpus is read
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.actors = actors
        self.device = device
        self.ran: dict = {}

    def describe(self) -> dict:
        return {"name": "ray", **self.ran}

    def encode(
        self, encoder: Encoder, chunks: list[Chunk], batch_size: int, with_tokens: bool
    ) -> Iterator[tuple[Chunk, Shard]]:
        ray = import_ray()
        with self._session(ray):
            cpus = max(1, int(ray.cluster_resources().get("CPU", 0)))  # 0: an autoscaler's bare head node
            actors = min(self.actors or cpus, len(chunks))
            per_actor = max(1, cpus // actors)
            self.ran.update(actors=actors, cpus_per_actor=per_actor, cluster_cpus=cpus)
            rows = [
                {"name": c.name, "modality": c.modality, "ids": [it.id for it in c.items], "values": _values(c)}
                for c in chunks
            ]
            # One block per chunk, so the pool hands chunks out one at a time to whichever actor is free.
            dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
                _ChunkEncoder,
                fn_constructor_kwargs={
                    "bundle_dir": str(Path(encoder.bundle_dir).resolve()),
                    "fingerprint": encoder.fingerprint,
                    "device": self.device,
                    "threads": per_actor,
                    "batch_size": batch_size,
                    "with_tokens": with_tokens,
                },
                batch_size=1,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=per_actor,
                num_gpus=1 if self.device == "cuda" else 0,
            )
            by_name = {c.name: c for c in chunks}
            for row in dataset.iter_rows():  # streamed: each chunk as soon as an actor finishes it
                yield by_name[row["name"]], shard_from_bytes(row["shard"])

    @contextmanager
    def _session(self, ray: Any) -> Iterator[None]:
        # The CLI draws its own progress bar: Ray Data's bars, and its lines about them, would only garble it (its
        # full logs stay in the session's log folder).
        context = ray.data.DataContext.get_current()
        data_log = logging.getLogger("ray.data")
        before = context.enable_progress_bars, context.print_on_execution_start, data_log.level
        context.enable_progress_bars = context.print_on_execution_start = False
        data_log.setLevel(logging.ERROR)
        try:
            with self._ray(ray):
                yield
        finally:
            context.enable_progress_bars, context.print_on_execution_start, level = before
            data_log.setLevel(level)

    @contextmanager
    def _ray(self, ray: Any) -> Iterator[None]:
        t0 = time.perf_counter()
        if ray.is_initialized():
            self.ran.update(address="existing", startup_seconds=0.0)
            yield
            return
        quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
        if self.address:
            ray.init(address=self.address, **quiet)
        else:
            ray.init(
                num_cpus=os.cpu_count() or 1,
                include_dashboard=False,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                **quiet,
            )
        self.ran.update(address=self.address or "local", startup_seconds=round(time.perf_counter() - t0, 3))
        try:
            yield
        finally:
            ray.shutdown()


def _values(chunk: Chunk) -> list[str]:
    """What an actor needs of each item: its text, or its media file as an absolute path (actors have their own
    working directory)."""
    if chunk.modality == "text":
        return [it.text for it in chunk.items]
    return [str(Path(getattr(it, chunk.modality)).resolve()) for it in chunk.items]


class _ChunkEncoder:
    """A Ray Data actor: loads the model once, then encodes the chunks it is sent, one row per chunk, into the
    shard's npz bytes. A file that cannot be decoded is a failure record in the shard (encode_chunk), so one bad
    item never fails the actor or the build."""

    def __init__(
        self, bundle_dir: str, fingerprint: str, device: str, threads: int, batch_size: int, with_tokens: bool
    ) -> None:
        self.encoder = Encoder(Path(bundle_dir), device=device, threads=threads)  # type: ignore[arg-type]
        if self.encoder.fingerprint != fingerprint:
            raise FingerprintMismatch(
                f"the bundle at {bundle_dir} on this Ray node is {self.encoder.fingerprint[:12]}, not the driver's "
                f"{fingerprint[:12]}: every node needs the same bundle at the same path"
            )
        self.batch_size, self.with_tokens = batch_size, with_tokens
        self.pool = ThreadPoolExecutor(max_workers=threads)  # decoding, as the local engine does

    def __call__(self, batch: Any) -> Any:  # a pyarrow.Table in, one out
        import pyarrow as pa

        names, blobs = [], []
        for row in batch.to_pylist():
            modality = row["modality"]
            items = [
                CorpusItem(id=i, text=v) if modality == "text" else CorpusItem(id=i, **{modality: Path(v)})
                for i, v in zip(row["ids"], row["values"], strict=True)
            ]
            chunk = Chunk(row["name"], modality, items)
            shard = encode_chunk(self.encoder, chunk, self.batch_size, self.with_tokens, self.pool.map)
            names.append(chunk.name)
            blobs.append(shard_to_bytes(shard))
        return pa.table({"name": pa.array(names, pa.string()), "shard": pa.array(blobs, pa.large_binary())})
