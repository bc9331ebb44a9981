"""Run a model bundle: preprocessing plus one ONNX Runtime session per tower. No torch here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.bundle import ModelManifest, load_manifest, verify_bundle
from models.errors import InvalidInput
from models.runtime import Device, create_session
from models.text import TextPreprocessor


@dataclass
class TokenOutput:
    """Per-item token vectors: ``tokens[i][:n_i]`` are item i's real tokens (L2-normalised)."""

    embedding: np.ndarray  # [B, D]
    tokens: list[np.ndarray]  # B arrays of [n_i, D]


class Encoder:
    """Loads a bundle once and encodes batches. Thread-safe: ONNX Runtime sessions allow concurrent run()."""

    def __init__(self, bundle_dir: Path, device: Device = "auto", threads: int = 0, verify: bool = True):
        self.bundle_dir = bundle_dir
        self.manifest: ModelManifest = verify_bundle(bundle_dir) if verify else load_manifest(bundle_dir)
        self._sessions = {}
        self.providers: dict[str, list[str]] = {}
        self._text: TextPreprocessor | None = None
        for modality, tower in self.manifest.towers.items():
            session, active = create_session(bundle_dir / tower.onnx, device=device, threads=threads)
            self._sessions[modality] = session
            self.providers[modality] = active
            if modality == "text":
                pre = tower.preprocessing
                self._text = TextPreprocessor(bundle_dir / pre.tokenizer, pre.max_length)

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

    def _feed(self, modality: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: arrays[name] for name in self.manifest.towers[modality].inputs}

    def encode_text(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """[len(texts), dim] float32, L2-normalised."""
        return self._run_text(texts, batch_size, with_tokens=False).embedding

    def encode_text_tokens(self, texts: list[str], batch_size: int = 32) -> TokenOutput:
        return self._run_text(texts, batch_size, with_tokens=True)

    def _run_text(self, texts: list[str], batch_size: int, with_tokens: bool) -> TokenOutput:
        if self._text is None:
            raise InvalidInput(f"model {self.name} has no text tower (it has {self.modalities})")
        if not texts:
            return TokenOutput(np.zeros((0, self.dim), dtype=np.float32), [])
        if any(not t.strip() for t in texts):
            raise InvalidInput("texts to encode must not be empty")
        session = self._sessions["text"]
        wanted = ["embedding", "tokens", "token_mask"] if with_tokens else ["embedding"]
        # Sort by token length so each batch pads to a similar width: less work for the same result.
        order = np.argsort(self._text.lengths(texts), kind="stable")
        emb = np.empty((len(texts), self.dim), dtype=np.float32)
        toks: list[np.ndarray] = [np.empty(0)] * len(texts)
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            feed = self._feed("text", self._text([texts[i] for i in idx]))
            out = session.run(wanted, feed)
            emb[idx] = out[0]
            if with_tokens:
                for row, i in enumerate(idx):
                    toks[i] = out[1][row][out[2][row].astype(bool)]
        return TokenOutput(emb, toks)

    def count_tokens(self, texts: list[str]) -> list[int]:
        if self._text is None:
            raise InvalidInput(f"model {self.name} has no text tower")
        return self._text.lengths(texts)
