"""IVF-PQ with its inverted lists on disk, for corpora whose index should not live in RAM (indexer.index_choice's
``IVF-PQ-disk``): FAISS's own on-disk inverted lists (faiss.contrib.ondisk), built the way that recipe does.

Building (:func:`build`): the coarse centroids, the PQ and the SQ8 re-ranking codes are trained on a sample; the
vectors are then read once, chunk by chunk, each added to a shard (an IVF with the trained quantizer, written to
disk every ``SHARD_ROWS`` rows) and encoded to SQ8 codes appended to a file; the shards' lists are then merged into
one ``.ivfdata`` file (``merge_ondisk``: OnDiskInvertedLists) and the shards removed. Memory stays a sample, a chunk
and a shard, whatever the corpus.

A modality's files in the segment: ``dense.<m>.faiss`` (the IVF-PQ: centroids, PQ tables, list headers, which names
its lists' file), ``dense.<m>.ivfdata`` (the lists: PQ codes and ids) and ``dense.<m>.refine.faiss`` (a FAISS
IndexScalarQuantizer holding every row's SQ8 code in row order). Searching (:func:`open_index`) maps the lists
(IO_FLAG_ONDISK_SAME_DIR: found beside the index file wherever the segment was moved) and the SQ8 codes
(IO_FLAG_MMAP_IFC), read-only, and wraps them in an IndexRefine: the IVF-PQ's best k_factor_rf * k candidates
re-ranked by their SQ8 scores. PQ codes alone level off near recall@10 0.82 (bench/refine.py); re-ranked they reach 0.95
(docs/benchmarks.md). FAISS's fast-scan PQ keeps its lists in blocks that on-disk lists cannot hold, so these are
plain 8-bit PQ codes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from indexer import faiss_backend
from indexer.layout import dense_file
from indexer.vector_source import VectorSource
from models.errors import BundleError

SHARD_ROWS = 1 << 20  # rows a shard: its lists (~56 MB at d=384) are written out and the memory freed
SHARDS = ".shards"  # the shards' folder inside the staging folder, removed once merged
_STDOUT = threading.Lock()


def ivfdata_file(modality: str) -> str:
    return f"dense.{modality}.ivfdata"


def refine_file(modality: str) -> str:
    return f"dense.{modality}.refine.faiss"


def files(modality: str) -> dict[str, str]:
    """What each file of a modality's on-disk index is (the manifest's ``files``)."""
    return {
        dense_file(modality): f"FAISS IVF-PQ of the {modality} rows (centroids, PQ tables, list headers); its inverted "
        f"lists are in {ivfdata_file(modality)}; FAISS id i is the modality's row i",
        ivfdata_file(modality): "FAISS OnDiskInvertedLists: every list's PQ codes and ids, memory-mapped for search",
        refine_file(modality): "FAISS IndexScalarQuantizer (SQ8) of every row in row order, memory-mapped: re-ranks "
        "the IVF-PQ's candidates",
    }


def build(
    folder: Path,
    modality: str,
    source: VectorSource,
    key: str,
    extra_rows: np.ndarray | None = None,
    on_extra: Callable[[np.ndarray], None] | None = None,
    observers: Iterable[Callable[[int, np.ndarray], None]] = (),
) -> None:
    """Write ``modality``'s on-disk index of ``source``'s vectors into ``folder`` (factory ``key``: ``IVFn,PQmnp,
    Refine(SQ8)``), trained on a sample sized for its lists (faiss_backend.train_rows). The vectors of ``extra_rows``
    are taken in the pass that takes the training sample and handed to ``on_extra`` before the vectors are added;
    each chunk read for the add is handed to every observer (first row, vectors): exact answers of those rows are
    computed in the same pass
    (indexer.dense_build)."""
    faiss = faiss_backend.import_faiss()
    index = faiss.index_factory(source.dim, key, faiss.METRIC_INNER_PRODUCT)
    if not isinstance(index, faiss.IndexRefine) or faiss.try_extract_index_ivf(index) is None:
        raise AssertionError(f"an on-disk index is an IVF with a refine step, not {key!r}")
    base = faiss.downcast_index(index.base_index)
    sq = faiss.downcast_index(index.refine_index)
    if not isinstance(sq, faiss.IndexScalarQuantizer):
        raise AssertionError(f"the refine step of an on-disk index is a scalar quantizer, not {key!r}")
    train_rows = faiss_backend.train_rows(source.n, faiss.extract_index_ivf(index).nlist)
    rows = np.arange(source.n) if train_rows is None else train_rows
    wanted = rows if extra_rows is None else np.concatenate([rows, extra_rows])
    taken = source.take(wanted)
    sample = taken[: len(rows)]
    if on_extra is not None:
        on_extra(taken[len(rows) :].copy())
    del taken
    base.train(sample)
    sq.train(sample)
    del sample

    shards_dir = folder / SHARDS
    shards_dir.mkdir()
    shard_paths: list[str] = []
    shard = faiss.clone_index(base)

    def flush() -> None:
        nonlocal shard
        if shard.ntotal:
            shard_paths.append(str(shards_dir / f"{modality}.{len(shard_paths)}.faiss"))
            faiss.write_index(shard, shard_paths[-1])
            shard = faiss.clone_index(base)

    codes_path = folder / refine_file(modality)
    with FlatCodesWriter(codes_path, sq, source.n) as codes:
        for start, block in source.chunks():
            for observe in observers:
                observe(start, block)
            shard.add_with_ids(block, np.arange(start, start + len(block), dtype=np.int64))
            codes.write(sq.sa_encode(block))
            if shard.ntotal >= SHARD_ROWS:
                flush()
        flush()
    del shard
    with faiss_notices_to_stderr():
        merge(base, shard_paths, folder / ivfdata_file(modality))
    faiss.write_index(base, str(folder / dense_file(modality)))
    shutil.rmtree(shards_dir)  # the lists written are unmapped as this returns (the index is released)


def merge(base: Any, shard_paths: list[str], ivfdata: Path) -> None:
    """The shards' lists merged into ``ivfdata`` (OnDiskInvertedLists), which then become ``base``'s lists. Rows keep
    the ids they were added with (shift_ids=False): their rows in the modality."""
    from faiss.contrib.ondisk import merge_ondisk

    if shard_paths:
        merge_ondisk(base, shard_paths, str(ivfdata))
        return
    faiss = faiss_backend.import_faiss()  # no rows: empty lists, still on disk
    ivf = faiss.extract_index_ivf(base)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ivfdata))
    ivf.replace_invlists(lists, True)
    lists.this.disown()


class FlatCodesWriter:
    """Writes a FAISS IndexScalarQuantizer file of ``n`` codes appended chunk by chunk, so they are never all in
    memory: the trained empty index serialised by FAISS, with its vector count and its codes' length set to hold
    ``n`` codes, followed by the codes. Checked by reading it back (FAISS's own reader) when closed."""

    def __init__(self, path: Path, trained: Any, n: int) -> None:
        faiss = faiss_backend.import_faiss()
        if trained.ntotal:
            raise AssertionError("the codes writer starts from an empty index")
        blob = faiss.serialize_index(trained).tobytes()
        self.code_size = int(trained.code_size)
        # FAISS's layout (faiss/impl/index_write.cpp): fourcc, d (int32), ntotal (int64), ..., then the codes as a
        # vector: its length (uint64) and bytes. An empty index ends with a zero length.
        if blob[:4] != b"IxSQ" or blob[8:16] != bytes(8) or blob[-8:] != bytes(8):
            raise AssertionError("unexpected FAISS IndexScalarQuantizer layout")
        self.path, self.n, self.written = path, n, 0
        self.file = open(path, "wb")  # noqa: SIM115 - closed by __exit__
        self.file.write(blob[:8] + np.int64(n).tobytes() + blob[16:-8] + np.uint64(n * self.code_size).tobytes())

    def write(self, codes: np.ndarray) -> None:
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        if codes.ndim != 2 or codes.shape[1] != self.code_size or self.written + len(codes) > self.n:
            raise AssertionError(f"codes of shape {codes.shape} after {self.written} of {self.n}")
        self.file.write(codes.tobytes())
        self.written += len(codes)

    def __enter__(self) -> FlatCodesWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if exc[0] is None:
            if self.written != self.n:
                raise AssertionError(f"{self.written} codes written of {self.n}")
            read = faiss_backend.import_faiss().read_index(str(self.path), _mmap_flags())
            if read.ntotal != self.n or read.code_size != self.code_size:
                raise AssertionError(f"{self.path} reads back as {read.ntotal} codes of {read.code_size} bytes")


def _mmap_flags() -> int:
    faiss = faiss_backend.import_faiss()
    return faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY


def open_index(folder: Path, modality: str) -> Any:
    """A modality's on-disk index for search: the IVF-PQ over its memory-mapped lists, re-ranked by the
    memory-mapped SQ8 codes (an IndexRefine), read-only. BundleError when the files cannot be read or disagree."""
    faiss = faiss_backend.import_faiss()
    try:
        with faiss_notices_to_stderr():
            base = faiss.read_index(
                str(folder / dense_file(modality)), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
            )
        codes = faiss.read_index(str(folder / refine_file(modality)), _mmap_flags())
        # FAISS starts prefetch threads (32) on every search to read the probed lists in ahead of the scan: with the
        # files in the page cache they cost more than they save (10M rows, one query at a time: 370 q/s with them,
        # 1,322 without; docs/benchmarks.md), and an uncached page is read in when touched anyway.
        faiss.downcast_InvertedLists(faiss.extract_index_ivf(base).invlists).prefetch_nthread = 0
        return faiss.IndexRefine(base, codes)  # the wrapper keeps both alive; it does not own them
    except RuntimeError as exc:
        raise BundleError(f"the on-disk index of the {modality} rows in {folder.name} cannot be read ({exc})") from None


@contextlib.contextmanager
def faiss_notices_to_stderr() -> Iterator[None]:
    """FAISS's on-disk lists print notices to the C stdout whenever they are merged or opened ("resizing ...",
    "IO_FLAG_ONDISK_SAME_DIR: updating ondisk filename ..."), where `xmodal index verify` prints its JSON: while
    they may, file descriptor 1 is file descriptor 2 (and C's buffer is flushed before it is put back)."""
    with _STDOUT:
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            os.dup2(2, 1)
            yield
        finally:
            ctypes.CDLL(None).fflush(None)
            os.dup2(saved, 1)
            os.close(saved)


def read_dense(folder: Path, modality: str, ondisk: bool, mmap: bool = False) -> Any:
    """A segment's dense index of one modality, as its manifest says it is stored: on disk (:func:`open_index`) or
    one FAISS file read into memory (memory-mapped with ``mmap``)."""
    if ondisk:
        return open_index(folder, modality)
    return faiss_backend.read(folder / dense_file(modality), mmap=mmap)
