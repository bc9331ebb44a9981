"""Export a sentence-transformers checkpoint folder (Transformer + mean or CLS pooling) to a text-only bundle."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from models.bundle import ModelManifest, TextPreprocessing
from models.errors import ExportError
from models.export.base import TowerExport, export_bundle, import_torch, text_tower, tower_module, tower_outputs

log = logging.getLogger(__name__)

TEXT_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def _read_st_config(source: Path) -> tuple[str, bool, int]:
    """(pooling, normalize, max_length) from a sentence-transformers checkpoint folder."""
    modules = json.loads((source / "modules.json").read_text())
    pooling, normalize = "mean", False
    for mod in modules:
        kind = mod["type"].rsplit(".", 1)[-1]
        if kind == "Pooling":
            cfg = json.loads((source / mod["path"] / "config.json").read_text())
            if cfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif cfg.get("pooling_mode_mean_tokens"):
                pooling = "mean"
            else:
                raise ExportError(f"unsupported pooling in {source}: {cfg}")
        elif kind == "Normalize":
            normalize = True
        elif kind not in ("Transformer",):
            raise ExportError(f"unsupported sentence-transformers module {mod['type']} in {source}")
    max_length = 512
    st_cfg = source / "sentence_bert_config.json"
    if st_cfg.is_file():
        max_length = int(json.loads(st_cfg.read_text()).get("max_seq_length", max_length))
    return pooling, normalize, max_length


def _text_wrapper(torch: Any, encoder: Any, pooling: str) -> Any:
    """Transformer → pooled, L2-normalised sentence vector, plus L2-normalised token vectors."""

    def forward(self, input_ids, attention_mask, token_type_ids):  # noqa: ANN001
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        if pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        # The cosine model is normalised either way; the manifest promises unit vectors.
        return tower_outputs(torch, pooled, hidden, attention_mask)

    return tower_module(torch, "SentenceTower", forward, encoder=encoder)


def _example(torch: Any) -> tuple:
    """Fixed (so the same checkpoint exports to the same bytes), all real tokens, as exported since the start."""
    ids = torch.arange(1000, 1016).reshape(2, 8)
    return ids, torch.ones(2, 8, dtype=torch.int64), torch.zeros(2, 8, dtype=torch.int64)


def export_sentence_transformers(source: Path, models_dir: Path, name: str, version: str = "1") -> ModelManifest:
    """Export a sentence-transformers checkpoint folder as a text-only bundle ``<models_dir>/<name>``."""
    torch, transformers = import_torch()
    source = Path(source)
    if not (source / "modules.json").is_file():
        raise ExportError(f"{source} is not a sentence-transformers checkpoint (no modules.json)")
    if not (source / "tokenizer.json").is_file():
        raise ExportError(f"{source} has no tokenizer.json (a fast tokenizer is required)")
    pooling, _normalize, max_length = _read_st_config(source)
    encoder = transformers.AutoModel.from_pretrained(str(source)).eval()
    module = _text_wrapper(torch, encoder, pooling)
    vocab = int(encoder.config.vocab_size)

    def towers(tmp: Path) -> list[TowerExport]:
        shutil.copyfile(source / "tokenizer.json", tmp / "tokenizer.json")
        pre = TextPreprocessing(tokenizer="tokenizer.json", max_length=max_length)
        return [text_tower(torch, module, tmp, pre, TEXT_INPUTS, vocab, example=_example(torch))]

    kind = {"kind": "sentence-transformers", "path": str(source), "pooling": pooling}
    return export_bundle(torch, models_dir, name, version, towers, kind)
