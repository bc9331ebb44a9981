"""Export checkpoints to xmodal model bundles (ONNX), each tower checked against torch before anything is written.

``base``: what every exporter shares (one tower = ``TowerExport`` → ``export_towers``: ONNX export, fusion,
parity; the text-tower plumbing; ``finish_bundle``). One module per source: ``sentence_transformers``, ``clip``
(CLIP / SigLIP), ``clap``, ``wordllama`` (static token embeddings). The trainer (``models.training.trainer``)
and the adapter (``models.align``) write their bundles with the same pieces. Needs the ``export`` extra;
importing this package does not import torch.
"""

from models.export.base import (
    MAX_ABS,
    MIN_COSINE,
    OUTPUTS,
    PARITY_TEXTS,
    TowerExport,
    check_tower_parity,
    export_onnx,
    export_towers,
    finish_bundle,
)
from models.export.clap import export_clap
from models.export.clip import export_clip
from models.export.sentence_transformers import export_sentence_transformers
from models.export.wordllama import export_wordllama

__all__ = [
    "MAX_ABS",
    "MIN_COSINE",
    "OUTPUTS",
    "PARITY_TEXTS",
    "TowerExport",
    "check_tower_parity",
    "export_clap",
    "export_clip",
    "export_onnx",
    "export_sentence_transformers",
    "export_towers",
    "export_wordllama",
    "finish_bundle",
]
