"""Text preprocessing without torch: the checkpoint's own tokenizer, through the `tokenizers` library."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from models.bundle import TextPreprocessing


class TextPreprocessor:
    def __init__(self, tokenizer_file: Path, max_length: int, pad_to_max_length: bool = False, pad_id: int = 0):
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.enable_truncation(max_length=max_length)
        self.tokenizer.no_padding()  # we pad per batch ourselves, after sorting by length
        self.max_length = max_length
        self.pad_to_max_length = pad_to_max_length
        self.pad_id = pad_id

    @classmethod
    def from_config(cls, bundle_dir: Path, config: TextPreprocessing) -> TextPreprocessor:
        return cls(bundle_dir / config.tokenizer, config.max_length, config.pad_to_max_length, config.pad_id)

    def token_strings(self, text: str) -> list[str]:
        """The text's real tokens as the tokenizer spells them (``[CLS]``, word pieces, ...), in model order."""
        enc = self.tokenizer.encode(text)
        return [t for t, m in zip(enc.tokens, enc.attention_mask, strict=True) if m]

    def token_spans(self, text: str) -> list[tuple[int, int] | None]:
        """Where each real token of ``token_strings`` lies in ``text`` (character offsets, end exclusive);
        None for a special token such as ``[CLS]``, which stands for no characters."""
        enc = self.tokenizer.encode(text)
        return [
            (a, b) if b > a and not special else None
            for (a, b), m, special in zip(enc.offsets, enc.attention_mask, enc.special_tokens_mask, strict=True)
            if m
        ]

    def lengths(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self.tokenizer.encode_batch(texts)]

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        """input_ids, attention_mask and token_type_ids, int64, padded to the longest text of the batch
        (or to max_length when the model was trained on fixed-length padding)."""
        encs = self.tokenizer.encode_batch(texts)
        width = self.max_length if self.pad_to_max_length else max(len(e.ids) for e in encs)
        ids = np.full((len(encs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros_like(ids, dtype=np.int64)
        types = np.zeros_like(mask)
        for row, e in enumerate(encs):
            n = len(e.ids)
            ids[row, :n] = e.ids
            mask[row, :n] = e.attention_mask
            types[row, :n] = e.type_ids
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
