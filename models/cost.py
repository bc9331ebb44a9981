"""What decoding an untrusted file will cost in memory, known from its header before any sample is decoded."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeCost:
    """``peak`` bytes while decoding; ``kept`` bytes while the decoded picture (or waveform) waits to be encoded and
    is turned into the tower's input."""

    peak: int
    kept: int
