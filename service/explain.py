"""Late results explained: each query token, and where in the item its best match lies (a word, a patch, a frame)."""

from __future__ import annotations

import math

from indexer.search import Hit
from models.encoder import Encoder
from service.schemas import TokenMatch


def describe(hit: Hit, encoder: Encoder, query_text: str | None, pooled: bool) -> list[TokenMatch]:
    query_words = encoder.text_token_strings(query_text) if query_text else None
    item_words = encoder.text_token_strings(hit.text) if hit.text and "text" in encoder.modalities else None
    out = []
    for m in hit.matches or []:
        if pooled:
            where = f"pooled {m.modality} token {m.item_token} of {m.item_tokens}"
        else:
            where = token_place(encoder, m.modality, m.item_token, m.item_tokens, item_words)
        word = query_words[m.query_token] if query_words and m.query_token < len(query_words) else None
        out.append(
            TokenMatch(
                query_token=m.query_token,
                query_text=word,
                modality=m.modality,
                item_token=m.item_token,
                where=where,
                similarity=round(m.similarity, 6),
            )
        )
    return out


def token_place(encoder: Encoder, modality: str, index: int, count: int, words: list[str] | None) -> str:
    """Token ``index`` of ``count`` of a row of ``modality``, in words."""
    if modality == "text":
        if words is not None and len(words) == count:
            return f"word {words[index]!r}"
        return f"text token {index} of {count}"
    if modality == "image":
        side = math.isqrt(count)
        if side * side == count:
            return f"patch row {index // side}, column {index % side} of {side}x{side}"
        side = math.isqrt(count - 1)
        if side * side == count - 1:  # a class token, then the patches (CLIP ViT)
            if index == 0:
                return "the class token (whole image)"
            return f"patch row {(index - 1) // side}, column {(index - 1) % side} of {side}x{side}"
        return f"image token {index} of {count}"
    if modality == "audio":
        clip = encoder.manifest.towers["audio"].preprocessing.clip_seconds
        span = clip / count
        return f"frames {index * span:.2f}-{(index + 1) * span:.2f} s of {clip:g} s"
    return f"{modality} token {index} of {count}"
