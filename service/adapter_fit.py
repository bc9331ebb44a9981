"""Fitting an upgrade's adapter on the index's own texts (``xmodal index upgrade`` when no adapter maps NEW to the
index's model): both models' text towers on a sample of the texts the index holds, which fits the projection where
the index's queries and items live (bench/align.py: Cranfield nDCG@10 0.282 fitted on 700 documents against 0.134
on vocabulary words). Writing the graph needs onnx (the `export` extra), so the service's jobs never come here."""

from __future__ import annotations

import numpy as np

from indexer.layout import VersionManifest
from models.adapter import AdapterManifest
from models.encoder import Encoder
from service.settings import Settings

MIN_TEXTS = 20  # fewer of the index's own: both tokenizers' vocabulary words (models.align's default)


def fit_on_index(settings: Settings, current: VersionManifest, new: Encoder, limit: int) -> AdapterManifest:
    from models.align import align
    from models.bundle import find_bundle

    models_dir = settings.all_models_dir
    old = find_bundle(models_dir, current.model.name, current.model.fingerprint)
    texts = index_texts(settings, current.name, limit)
    label = f"index {current.name} version {current.version}: {len(texts)} of its texts"
    return align(
        models_dir,
        new.bundle_dir.relative_to(models_dir).as_posix(),
        old.relative_to(models_dir).as_posix(),
        name=f"{new.name}-to-{current.model.name}",
        texts=texts if len(texts) >= MIN_TEXTS else None,
        texts_label=label if len(texts) >= MIN_TEXTS else None,
    )


def index_texts(settings: Settings, name: str, limit: int) -> list[str]:
    """At most ``limit`` of the published version's distinct item texts, drawn over the whole index (seeded)."""
    from indexer.reencode import items_of_version

    texts = sorted({it.text for it in items_of_version(settings.indexes_dir, name) if it.text})
    if len(texts) <= limit:
        return texts
    pick = np.random.default_rng(0).choice(len(texts), size=limit, replace=False)
    return [texts[i] for i in sorted(pick)]
