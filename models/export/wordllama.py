"""Export the static token embeddings that the ``wordllama`` package ships (``l2_supercat``, 256-d: a Llama-2
tokenizer's 32,000 token vectors, trained by distillation from LLM embeddings) as a text-only xmodal bundle.

The model is a lookup and an average, so the graph is tiny and fast on a CPU:

text (inputs ``input_ids, attention_mask``; dynamic batch and length)
  ``embedding`` [B, D]  the mean of the real tokens' vectors (padding masked), L2-normalised: exactly
                        ``WordLlama.embed(texts, norm=True)``.
  ``tokens`` [B, T, D]  each token's own vector, L2-normalised (static: the same word piece gives the same vector
                        wherever it stands).
  ``token_mask`` [B, T] int32, the attention mask.

Decisions, and why:

- The weights stay float16 in the graph (as shipped; 16 MB) and are cast to float32 after the lookup, which is what
  ``wordllama`` does (``embedding.astype(float32)``), so the numbers are the same, not merely close.
- ``wordllama`` tokenizes with ``add_special_tokens=False`` (no ``<s>``); the bundle's ``tokenizer.json`` is the
  shipped one with its post-processor removed, so the runtime's ``TextPreprocessor`` (which adds special tokens)
  gives the same ids.
- ``wordllama`` never truncates; the bundle truncates at ``MAX_LENGTH`` tokens (a manifest needs a bound, and the
  index stores one vector per token). Texts longer than that differ from ``embed()``.

Parity: torch vs ONNX Runtime like every tower (``models.export.base``), and the staged bundle against
``wordllama``'s own ``embed()`` on batch sizes and lengths other than the trace's (``reference`` in the manifest's
parity). Needs the ``export`` extra (torch) and the ``wordllama`` package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from models.bundle import ModelManifest, TextPreprocessing
from models.errors import MissingDependency, ParityError
from models.export.base import (
    MAX_ABS,
    MIN_COSINE,
    PARITY_TEXTS,
    TowerExport,
    export_bundle,
    import_torch,
    text_tower,
    tower_module,
    tower_outputs,
)
from models.files import sha256_file
from models.runtime import create_session
from models.text import TextPreprocessor

CONFIG = "l2_supercat"
DIM = 256
MAX_LENGTH = 512
TEXT_INPUTS = ["input_ids", "attention_mask"]
# Batches for the check against wordllama.embed: other sizes and lengths than the trace (2 x 8).
REFERENCE_TEXTS = [
    *PARITY_TEXTS,
    "",
    "Ünïcödé façade naïve café — 東京 and émojis 🚲🚲",
    " ".join(["pressure distribution on a cambered plate"] * 30),
]


def load_wordllama(dim: int = DIM) -> tuple[Any, Path, Path]:
    """(the WordLlamaInference model, its weights file, its tokenizer file), from the installed package only."""
    try:
        import wordllama
        from wordllama import WordLlama
    except ImportError as exc:
        raise MissingDependency(
            "the wordllama model ships in the `wordllama` package: pip install 'xmodal[export]'"
        ) from exc
    # The package's files: its own lookup of them is broken (it looks in "tokenizer/", they are in "tokenizers/"),
    # so the package folder is passed as the cache, which is laid out as the loader expects.
    package = Path(wordllama.__file__).parent
    model = WordLlama.load(config=CONFIG, dim=dim, cache_dir=package, disable_download=True)
    return (
        model,
        package / "weights" / f"{CONFIG}_{dim}.safetensors",
        package / "tokenizers" / f"{CONFIG}_tokenizer_config.json",
    )


def _static_tower(torch: Any, weight: np.ndarray) -> Any:
    """Lookup (float16 table, cast to float32), masked mean, L2 norm."""

    def forward(self, input_ids, attention_mask):  # noqa: ANN001
        vectors = self.table(input_ids).float()
        m = attention_mask.unsqueeze(-1).to(vectors.dtype)
        pooled = (vectors * m).sum(1) / m.sum(1).clamp(min=1.0)
        return tower_outputs(torch, pooled, vectors, attention_mask)

    table = torch.nn.Embedding.from_pretrained(torch.from_numpy(weight), freeze=True)
    return tower_module(torch, "StaticTextTower", forward, table=table)


def _write_tokenizer(source: Path, dest: Path) -> None:
    """The shipped tokenizer without its post-processor (``wordllama`` encodes without special tokens)."""
    config = json.loads(source.read_text())
    config.update(post_processor=None, padding=None, truncation=None)
    dest.write_text(json.dumps(config, ensure_ascii=False))


def reference_parity(model: Any, bundle_dir: Path, pre: TextPreprocessing) -> dict:
    """The staged graph with the bundle's own tokenizer vs ``model.embed(texts, norm=True)``: per-row cosine and the
    largest element difference, on batches of 8, 1, 3 and 5 texts (lengths 0 to a few hundred tokens)."""
    session, providers = create_session(bundle_dir / "text.onnx", device="cpu")
    own = TextPreprocessor.from_config(bundle_dir, pre)
    texts = REFERENCE_TEXTS
    worst_cos, worst_abs, shapes = 1.0, 0.0, []
    for batch in (texts, texts[1:2], texts[5:8], texts[:5]):
        feed = own(batch)
        shapes.append(list(feed["input_ids"].shape))
        got = session.run(["embedding"], {n: feed[n] for n in TEXT_INPUTS})[0]
        with np.errstate(invalid="ignore"):  # "" is 0/0 there: a zero vector here
            want = np.nan_to_num(model.embed(list(batch), norm=True))
        cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1) + 1e-12)
        real = np.linalg.norm(want, axis=-1) > 0
        worst_cos = min(worst_cos, float(cos[real].min()))
        worst_abs = max(worst_abs, float(np.abs(got - want).max()))
    report = {"against": "wordllama.embed(norm=True)", "min_cosine": worst_cos, "max_abs_diff": worst_abs}
    report.update(shapes=shapes, providers=providers)
    if worst_cos < MIN_COSINE or worst_abs > MAX_ABS:
        raise ParityError(
            f"text tower differs from wordllama.embed: min row cosine {worst_cos:.6f}, max |diff| {worst_abs:.2e}; "
            "no bundle written",
            **report,
        )
    return report


def export_wordllama(models_dir: Path, name: str, dim: int = DIM, version: str = "1") -> ModelManifest:
    """Export the installed ``wordllama`` package's ``l2_supercat`` embeddings (``dim``-d) as bundle ``name``."""
    import wordllama

    torch, _ = import_torch()
    model, weights, tokenizer = load_wordllama(dim)
    from safetensors import safe_open

    with safe_open(str(weights), framework="np") as f:
        table = np.ascontiguousarray(f.get_tensor("embedding.weight"))  # float16 as shipped
    module = _static_tower(torch, table)
    pre = TextPreprocessing(tokenizer="tokenizer.json", max_length=MAX_LENGTH)

    def towers(tmp: Path) -> list[TowerExport]:
        _write_tokenizer(tokenizer, tmp / "tokenizer.json")
        return [text_tower(torch, module, tmp, pre, TEXT_INPUTS, len(table))]

    source = {
        "kind": "wordllama",
        "package": f"wordllama {getattr(wordllama, '__version__', '?')}",
        "config": CONFIG,
        "weights": weights.name,
        "weights_sha256": sha256_file(weights),
        "pooling": "mean over real tokens, no special tokens",
        "max_length": MAX_LENGTH,
    }
    return export_bundle(
        torch,
        models_dir,
        name,
        version,
        towers,
        source,
        reference=lambda tmp: {"text": reference_parity(model, tmp, pre)},
    )
