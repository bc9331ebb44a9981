"""Run a model bundle: preprocessing plus one ONNX Runtime session per tower. No torch here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.bundle import (
    AudioPreprocessing,
    ImagePreprocessing,
    ModelManifest,
    TextPreprocessing,
    load_manifest,
    verify_bundle,
)
from models.cost import DecodeCost
from models.errors import InvalidInput
from models.runtime import Device, create_session
from models.text import TextPreprocessor


@dataclass
class TokenOutput:
    """Per-item token vectors: ``tokens[i]`` holds item i's real tokens only, [n_i, D], L2-normalised."""

    embedding: np.ndarray  # [B, D]
    tokens: list[np.ndarray]


class Encoder:
    """Loads a bundle once and encodes batches. Thread-safe: ONNX Runtime sessions allow concurrent run()."""

    def __init__(
        self, bundle_dir: Path, device: Device = "auto", threads: int = 0, verify: bool = True, spinning: bool = True
    ):
        self.bundle_dir = bundle_dir
        self.manifest: ModelManifest = verify_bundle(bundle_dir) if verify else load_manifest(bundle_dir)
        self._sessions: dict[str, Any] = {}
        self._pre: dict[str, Any] = {}
        self.providers: dict[str, list[str]] = {}
        for modality, tower in self.manifest.towers.items():
            session, active = create_session(bundle_dir / tower.onnx, device, threads, spinning)
            self._sessions[modality] = session
            self.providers[modality] = active
            config = tower.preprocessing
            if isinstance(config, TextPreprocessing):
                self._pre[modality] = TextPreprocessor.from_config(bundle_dir, config)
            elif isinstance(config, ImagePreprocessing):
                from models.image import ImagePreprocessor  # Pillow only for bundles with an image tower

                self._pre[modality] = ImagePreprocessor(config)
            elif isinstance(config, AudioPreprocessing):
                from models.audio import AudioPreprocessor  # soundfile/soxr only for bundles with audio

                self._pre[modality] = AudioPreprocessor(config)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def modalities(self) -> list[str]:
        return sorted(self.manifest.towers)

    def preprocessor(self, modality: str) -> Any:
        """The tower's preprocessor (tokenizer, image resizer, audio features), for callers that need its geometry."""
        if modality not in self._pre:
            raise InvalidInput(f"model {self.name} has no {modality} tower (it has {self.modalities})")
        return self._pre[modality]

    # --- text ----------------------------------------------------------------------------------
    def encode_text(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """[len(texts), dim] float32, L2-normalised."""
        return self._encode_texts(texts, batch_size, with_tokens=False).embedding

    def encode_text_tokens(self, texts: list[str], batch_size: int = 32) -> TokenOutput:
        return self._encode_texts(texts, batch_size, with_tokens=True)

    def text_token_strings(self, text: str) -> list[str]:
        """The strings of the tokens ``encode_text_tokens`` returns vectors for, one per vector."""
        return self.preprocessor("text").token_strings(text)

    def text_token_spans(self, text: str) -> list[tuple[int, int] | None]:
        """Character offsets in ``text`` of each token ``text_token_strings`` names (None: a special token)."""
        return self.preprocessor("text").token_spans(text)

    def count_tokens(self, texts: list[str]) -> list[int]:
        return self.preprocessor("text").lengths(texts)

    def _encode_texts(self, texts: list[str], batch_size: int, with_tokens: bool) -> TokenOutput:
        pre = self.preprocessor("text")
        if any(not t.strip() for t in texts):
            raise InvalidInput("texts to encode must not be empty")
        # Sort by token length so each batch pads to a similar width: less work for the same result.
        order = np.argsort(pre.lengths(texts), kind="stable") if texts else np.zeros(0, dtype=int)
        return self._run("text", len(texts), order, lambda idx: pre([texts[i] for i in idx]), batch_size, with_tokens)

    # --- images and audio ---------------------------------------------------------------------
    def decode(self, modality: str, data: bytes | Path) -> Any:
        """An image file → RGB PIL image; an audio file → mono float32 waveform at the tower's rate.
        InvalidInput says why the bytes or file cannot be used."""
        return self.preprocessor(modality).decode(data)

    def decode_cost(self, modality: str, data: bytes) -> DecodeCost:
        """``DecodeCost`` of decoding these bytes (header only), or InvalidInput for what ``decode`` would refuse
        for its size."""
        return self.preprocessor(modality).decode_cost(data)

    def encode_media(self, modality: str, decoded: Sequence[Any], batch_size: int = 16) -> np.ndarray:
        """Decoded images or waveforms (see ``decode``) → [len(decoded), dim] float32, L2-normalised."""
        return self._encode_media(modality, decoded, batch_size, with_tokens=False).embedding

    def encode_media_tokens(self, modality: str, decoded: Sequence[Any], batch_size: int = 16) -> TokenOutput:
        return self._encode_media(modality, decoded, batch_size, with_tokens=True)

    def _encode_media(self, modality: str, decoded: Sequence[Any], batch_size: int, with_tokens: bool) -> TokenOutput:
        if modality == "text":
            raise InvalidInput("texts go through encode_text")
        pre = self.preprocessor(modality)
        order = np.arange(len(decoded))
        return self._run(
            modality, len(decoded), order, lambda idx: pre([decoded[i] for i in idx]), batch_size, with_tokens
        )

    # --- shared --------------------------------------------------------------------------------
    def _run(
        self,
        modality: str,
        n: int,
        order: np.ndarray,
        prepare: Callable[[np.ndarray], dict[str, np.ndarray]],
        batch_size: int,
        with_tokens: bool,
    ) -> TokenOutput:
        session = self._sessions[modality]
        inputs = self.manifest.towers[modality].inputs
        wanted = ["embedding", "tokens", "token_mask"] if with_tokens else ["embedding"]
        emb = np.empty((n, self.dim), dtype=np.float32)
        toks: list[np.ndarray] = [np.empty((0, self.dim), dtype=np.float32)] * n
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            arrays = prepare(idx)
            out = session.run(wanted, {name: arrays[name] for name in inputs})
            emb[idx] = out[0]
            if with_tokens:
                for row, i in enumerate(idx):
                    toks[i] = out[1][row][out[2][row].astype(bool)]
        return TokenOutput(emb, toks)
