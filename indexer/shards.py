"""Checkpointed encoding. A build saves each encoded chunk (its vectors, token vectors and failures) as soon as it is
done, fsynced and written atomically, under ``<index>/.shards/<key>/``; the key names exactly what was being
encoded (the model, the items in their order, their media files' sizes and times, the chunking). A build killed
mid-way and run again with the same items and model reads the finished chunks back and encodes only the rest, so
at most the chunk it was in is encoded twice. The folder goes once the version is written."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.corpus import MEDIA, CorpusItem
from models.files import atomic_write_bytes

log = logging.getLogger(__name__)
SHARDS = ".shards"
FORMAT = 1
STALE_S = 3600  # another key's folder untouched this long belongs to no running build


@dataclass
class Shard:
    """One encoded chunk: which of its items were encoded (the others failed to decode), their vectors, and with
    tokens each one's token vectors."""

    ok: np.ndarray  # int32 positions within the chunk
    vectors: np.ndarray  # float32 [len(ok), D]
    tokens: list[np.ndarray] | None  # float16 [n_i, D] each
    failures: list[dict]


def build_key(fingerprint: str, items: list[CorpusItem], chunk: int, with_tokens: bool) -> str:
    """sha256 over everything the encoded chunks depend on. Metadata is left out: it changes no vector."""
    h = hashlib.sha256(
        json.dumps({"format": FORMAT, "model": fingerprint, "chunk": chunk, "tokens": with_tokens}).encode()
    )
    for it in items:
        media = []
        for m in MEDIA:
            path = getattr(it, m)
            if path is not None:
                try:
                    st = Path(path).stat()
                    media.append([m, str(path), st.st_size, st.st_mtime_ns])
                except OSError:
                    media.append([m, str(path), None, None])
        h.update(json.dumps([it.id, it.text, media]).encode() + b"\n")
    return h.hexdigest()


def shard_to_bytes(shard: Shard) -> bytes:
    """A chunk as an .npz (no pickle): how a checkpoint is saved, and how a Ray actor sends a chunk back."""
    dim = shard.vectors.shape[1]
    tokens = shard.tokens or []
    buf = io.BytesIO()
    np.savez(
        buf,
        has_tokens=np.array(shard.tokens is not None),
        ok=np.asarray(shard.ok, dtype=np.int32),
        vectors=np.asarray(shard.vectors, dtype=np.float32),
        token_counts=np.array([len(t) for t in tokens], dtype=np.int32),
        tokens=np.concatenate(tokens).astype(np.float16) if tokens else np.zeros((0, dim), dtype=np.float16),
        failures=np.frombuffer(json.dumps(shard.failures).encode(), dtype=np.uint8),
    )
    return buf.getvalue()


def shard_from_bytes(data: bytes) -> Shard:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        tokens = None
        if bool(z["has_tokens"]):
            counts = z["token_counts"]
            tokens = np.split(z["tokens"], np.cumsum(counts)[:-1]) if counts.size else []
        return Shard(z["ok"], z["vectors"], tokens, json.loads(z["failures"].tobytes().decode()))


class ShardStore:
    def __init__(self, index_root: Path, key: str) -> None:
        self.root = index_root / SHARDS
        self.dir = self.root / key[:32]

    def load(self, name: str) -> Shard | None:
        """The chunk ``name`` if a complete, readable copy is saved, else None (then it is encoded again)."""
        path = self.dir / f"{name}.npz"
        if not path.is_file():
            return None
        try:
            return shard_from_bytes(path.read_bytes())
        except Exception as exc:  # noqa: BLE001 - a damaged checkpoint costs a re-encode, never the build
            log.warning("checkpoint %s unreadable (%s): encoding it again", path, exc)
            return None

    def save(self, name: str, shard: Shard) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.dir / f"{name}.npz", shard_to_bytes(shard))  # whole or absent, fsynced

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()

    def prune_stale(self, max_age_s: float = STALE_S) -> list[Path]:
        """Remove other builds' checkpoints untouched for ``max_age_s`` (killed builds never run again); a running
        build writes a chunk every few seconds, so its folder is never stale."""
        removed = []
        if not self.root.is_dir():
            return removed
        now = time.time()
        for folder in self.root.iterdir():
            if folder == self.dir or not folder.is_dir():
                continue
            newest = max((p.stat().st_mtime for p in folder.iterdir()), default=folder.stat().st_mtime)
            if now - newest > max_age_s:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        return removed
