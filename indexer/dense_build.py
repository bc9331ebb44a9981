"""One modality's dense index of a segment, built as indexer.index_choice chose (in RAM, or on disk through
indexer.ondisk), with the exact answers its search parameters are tuned on and its recall is held to: two samples of
its rows as queries (tuning and held-out, indexer.heldout), answered by brute force over the float vectors; for an
index on disk in the very pass that adds the vectors, so they are read twice in all (sample, then add) and never
held. bench/scale.py builds through this too."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer import faiss_backend, heldout, ondisk, tuning
from indexer.gpu import Placement
from indexer.layout import dense_file
from indexer.tuning import KEEP, TopK, Truth
from indexer.vector_source import VectorSource

K = 10  # recall@10


@dataclass
class Built:
    index: Any  # searchable: in memory, or the on-disk files opened memory-mapped, as a segment reader opens them
    placement: Placement  # where it was built, and why
    tune: Truth
    heldout: Truth
    ondisk: bool


def build(
    folder: Path,
    modality: str,
    source: VectorSource,
    key: str,
    ondisk_lists: bool,
    use_gpu: bool = True,
    observers: list[Callable[[int, np.ndarray], None]] | None = None,
) -> Built:
    """Build ``modality``'s index of ``source`` with factory ``key``: on disk with ``ondisk_lists`` (its files are
    written into ``folder`` now), else in RAM (the caller writes it once tuned). ``observers``: more callbacks of the
    pass that answers the sample queries (first row, chunk), e.g. to answer other queries in it too."""
    tune_rows, held_rows = heldout.split_samples(source.n)
    k = min(K, source.n - 1)
    tops: list[TopK] = []

    def answer(queries: np.ndarray) -> None:
        tops.append(TopK(queries[: len(tune_rows)], KEEP, tune_rows))
        tops.append(TopK(queries[len(tune_rows) :], KEEP, held_rows))

    def observe(start: int, block: np.ndarray) -> None:
        for top in tops:
            top.add(start, block)
        for other in observers or ():
            other(start, block)

    rows = np.concatenate([tune_rows, held_rows])
    if ondisk_lists:
        ondisk.build(folder, modality, source, key, rows, answer, [observe])
        index = ondisk.open_index(folder, modality)
        placement = Placement("cpu", "on-disk inverted lists are built and searched on the CPU")
    else:
        if source.array is None:
            raise AssertionError("an index built in RAM is built from an array")
        index, placement = faiss_backend.build(np.ascontiguousarray(source.array, dtype=np.float32), key, use_gpu)
        answer(source.take(rows))
        for start, block in source.chunks():
            observe(start, block)
    tune, held = (top.truth(k) for top in tops)
    return Built(index=index, placement=placement, tune=tune, heldout=held, ondisk=ondisk_lists)


def tune_and_write(
    folder: Path, built: dict[str, Built], key: str, target: float, truth_over: str
) -> tuple[dict, dict, dict[str, str]]:
    """Tune the search parameters of every modality's index together (indexer.tuning.tune), measure their recall on
    the held-out samples, and write what is left to write: the indexes built in RAM (with the parameters set) and the
    held-out answers. Returns (parameters, recall: the tuning sample's and ``heldout``, the files written with what
    each is)."""
    params, recall = tuning.tune([(b.index, b.tune) for b in built.values()], faiss_backend.default_params(key), target)
    held = tuning.measure([(b.index, b.heldout) for b in built.values()])
    recall["heldout"] = {**held, "truth": f"exact search over {truth_over}", "files": heldout.FOLDER}
    files = {}
    for modality, b in built.items():
        if b.ondisk:
            files.update(ondisk.files(modality))
        else:
            faiss_backend.apply_params(b.index, params)  # the file carries them (the reader applies them too)
            faiss_backend.write(b.index, folder / dense_file(modality))
            files[dense_file(modality)] = (
                f"FAISS index of the {modality} rows' vectors; FAISS id i is the modality's row i"
            )
        heldout.write(folder, modality, b.heldout)
        files.update(heldout.files(modality))
    return params, recall, files
