"""Vectors read chunk by chunk in row order, as often as needed: an array (or a memory map) of encoded rows, or
chunks made on the fly (bench/scale.py's 10M synthetic vectors, never held whole). What an index built on disk
(indexer.ondisk) reads, so that its memory does not grow with the corpus."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

CHUNK = 65_536


@dataclass
class VectorSource:
    n: int
    dim: int
    make_chunks: Callable[[], Iterable[np.ndarray]]
    array: np.ndarray | None = None  # the vectors themselves, when they are one array

    @classmethod
    def of_array(cls, array: np.ndarray, chunk: int = CHUNK) -> VectorSource:
        return cls(
            n=int(array.shape[0]),
            dim=int(array.shape[1]),
            make_chunks=lambda: (array[s : s + chunk] for s in range(0, array.shape[0], chunk)),
            array=array,
        )

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 [rows, dim] C-contiguous) in row order; AssertionError if the chunks do not add up
        to ``n`` rows of ``dim``."""
        start = 0
        for block in self.make_chunks():
            block = np.ascontiguousarray(block, dtype=np.float32)
            if block.ndim != 2 or block.shape[1] != self.dim:
                raise AssertionError(f"a chunk of shape {block.shape}, expected [rows, {self.dim}]")
            yield start, block
            start += len(block)
        if start != self.n:
            raise AssertionError(f"the chunks held {start} rows, expected {self.n}")

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 [len(rows), dim]: the given rows in the given order (one pass over the chunks unless an array)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.array is not None:
            return np.ascontiguousarray(self.array[rows], dtype=np.float32)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        for start, block in self.chunks():
            lo, hi = np.searchsorted(sorted_rows, [start, start + len(block)])
            out[order[lo:hi]] = block[sorted_rows[lo:hi] - start]
        return out
