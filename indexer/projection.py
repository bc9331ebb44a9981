"""Searching a segment of the OLD model with a NEW model's query during a model upgrade (issue 16): the query goes
through the adapter into OLD's space (the map of the query's tower where the adapter has one), and the scores come
back onto NEW's scale (the adapter's score map), so hits of OLD and NEW segments merge on one scale. A segment of the
query's own model has no projection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class Projector(Protocol):
    """What a projection needs of an adapter (models.adapter.Adapter): NEW vectors [..., D_new] -> OLD [..., D_old]."""

    def project(self, vectors: np.ndarray, modality: str | None = None) -> np.ndarray: ...


@dataclass(frozen=True)
class Projection:
    adapter: Projector
    slope: float = 1.0
    intercept: float = 0.0

    @classmethod
    def of(cls, adapter: Projector, score_map: dict) -> Projection:
        """With the fitted map where it keeps the order (a positive slope), else scores as they come."""
        slope = float(score_map.get("slope", 1.0))
        if not np.isfinite(slope) or slope <= 0:
            return cls(adapter)
        return cls(adapter, slope, float(score_map.get("intercept", 0.0)))

    def vectors(self, x: np.ndarray, modality: str | None = None) -> np.ndarray:
        return np.ascontiguousarray(self.adapter.project(x, modality), dtype=np.float32)

    def scores(self, s: np.ndarray) -> np.ndarray:
        """Monotone: a segment's own order is kept; only its place among other segments' hits moves."""
        return (s * self.slope + self.intercept).astype(np.float32)


class Query:
    """A query array (a vector [1, D] or token vectors [L, D]) in the query model's space, and, projected once on
    first use, in the OLD model's space: what each segment is searched with (``of``)."""

    def __init__(self, x: np.ndarray, modality: str | None) -> None:
        self.x, self.modality = x, modality
        self._projected: np.ndarray | None = None

    def of(self, space: Projection | None) -> np.ndarray:
        if space is None:
            return self.x
        if self._projected is None:
            self._projected = space.vectors(self.x, self.modality)
        return self._projected
