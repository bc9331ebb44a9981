"""Late results explained: each query token, and where in the item its best match lies (a word, a patch, a frame)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from indexer.search import Hit
from models.encoder import Encoder
from service.schemas import TokenMatch


@dataclass(frozen=True)
class Place:
    """Where a matched item token lies: in words, and for the search page as a box over the item's picture
    (fractions of the thumbnail, which is the model's view, or of the waveform, which spans the clip window) or
    as characters of the item's text."""

    where: str
    box: tuple[float, float, float, float] | None = None
    chars: tuple[int, int] | None = None


def describe(hit: Hit, encoder: Encoder, query_text: str | None, pooled: bool) -> list[TokenMatch]:
    query_words = encoder.text_token_strings(query_text) if query_text else None
    item_words = None  # the caption's tokens, only when a query token matched a word of it
    if hit.text and "text" in encoder.modalities and any(m.modality == "text" for m in hit.matches or []):
        item_words = list(zip(encoder.text_token_strings(hit.text), encoder.text_token_spans(hit.text), strict=True))
    out = []
    for m in hit.matches or []:
        if pooled:
            place = Place(f"pooled {m.modality} token {m.item_token} of {m.item_tokens}")
        else:
            place = token_place(encoder, m.modality, m.item_token, m.item_tokens, item_words)
        word = query_words[m.query_token] if query_words and m.query_token < len(query_words) else None
        out.append(
            TokenMatch(
                query_token=m.query_token,
                query_text=word,
                modality=m.modality,
                item_token=m.item_token,
                where=place.where,
                box=None if place.box is None else [round(v, 6) for v in place.box],
                chars=None if place.chars is None else list(place.chars),
                heat=None if m.heat is None else [round(float(v), 4) for v in m.heat],
                similarity=round(m.similarity, 6),
            )
        )
    return out


def token_place(
    encoder: Encoder, modality: str, index: int, count: int, words: list[tuple[str, tuple[int, int] | None]] | None
) -> Place:
    """Token ``index`` of ``count`` of a row of ``modality``: in words, and where to highlight it."""
    if modality == "text":
        if words is not None and len(words) == count:
            word, chars = words[index]
            return Place(f"word {word!r}", chars=chars)
        return Place(f"text token {index} of {count}")
    if modality == "image":
        side = math.isqrt(count)
        if side * side != count:
            side = math.isqrt(count - 1)
            if side * side != count - 1:
                return Place(f"image token {index} of {count}")
            if index == 0:  # a class token, then the patches (CLIP ViT)
                return Place("the class token (whole image)", box=(0.0, 0.0, 1.0, 1.0))
            index -= 1
        row, col = divmod(index, side)
        box = (col / side, row / side, (col + 1) / side, (row + 1) / side)
        return Place(f"patch row {row}, column {col} of {side}x{side}", box=box)
    if modality == "audio":
        clip = encoder.manifest.towers["audio"].preprocessing.clip_seconds
        span = clip / count
        box = (index / count, 0.0, (index + 1) / count, 1.0)
        return Place(f"frames {index * span:.2f}-{(index + 1) * span:.2f} s of {clip:g} s", box=box)
    return Place(f"{modality} token {index} of {count}")
