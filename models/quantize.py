"""Derive a lighter bundle from an exported one: int8 dynamic quantisation (MatMul/Gemm weights only) for
CPUs, or fp16 weights and activations for GPUs. Parity is measured against the fp32 bundle, itself
checked against torch at export, on inputs of each tower; a derived bundle under its threshold is refused.

Runs with ONNX Runtime alone (its quantisation and float16 tools need the `onnx` package, which comes
with the `export` extra): no torch.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import Literal

import numpy as np

from models.bundle import MANIFEST, ModelManifest, compute_fingerprint, verify_bundle
from models.encoder import Encoder
from models.errors import InvalidInput, MissingDependency, ParityError
from models.files import atomic_write_json, replace_dir, staging_dir

Precision = Literal["int8", "fp16"]
# Minimum per-row cosine to the fp32 bundle's embeddings; int8 weights cost more accuracy than fp16.
MIN_COSINE: dict[str, float] = {"int8": 0.99, "fp16": 0.999}
SAMPLE_TEXTS = [
    "a photograph of a dog running on the beach",
    "two people ride bicycles past a red brick building at sunset",
    "piano",
    "the sound of rain falling on a tin roof while thunder rolls in the distance",
    "a bowl of fruit",
]


def _convert(src: Path, dst: Path, precision: Precision) -> None:
    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:
        raise MissingDependency(
            f"converting to {precision} needs the onnx package: pip install 'xmodal[export]'"
        ) from exc
    if precision == "int8":
        # Per-channel weight scales: per-tensor int8 cost MiniLM 0.04 of cosine, per-channel 0.005.
        quantize_dynamic(
            str(src), str(dst), op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8, per_channel=True
        )
    else:
        # Inputs and outputs stay fp32, so callers and the manifest's contract do not change.
        onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))


def _sample_inputs(encoder: Encoder, modality: str) -> list:
    """Inputs for a tower: texts, or synthetic images and sounds decoded like real ones."""
    if modality == "text":
        return SAMPLE_TEXTS
    rng = np.random.default_rng(0)
    if modality == "image":
        from PIL import Image

        return [Image.fromarray(rng.integers(0, 256, (48 + 16 * i, 64, 3), dtype=np.uint8)) for i in range(4)]
    rate = encoder.manifest.towers[modality].preprocessing.sample_rate
    t = np.arange(int(rate * 1.5)) / rate
    return [(0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32) for f in (220.0, 440.0, 1000.0)] + [
        (0.1 * rng.standard_normal(rate)).astype(np.float32)
    ]


def _embed(encoder: Encoder, modality: str, inputs: list) -> np.ndarray:
    if modality == "text":
        return encoder.encode_text(inputs)
    return encoder.encode_media(modality, inputs)


def derive(models_dir: Path, source: str, precision: Precision, name: str | None = None) -> ModelManifest:
    """Write ``<models_dir>/<name>`` (default ``<source>-<precision>``) from bundle ``source``."""
    if precision not in MIN_COSINE:
        raise InvalidInput(f"precision must be one of {sorted(MIN_COSINE)}, not {precision!r}")
    src_dir = models_dir / source
    manifest = verify_bundle(src_dir)
    if manifest.precision != "fp32":
        raise InvalidInput(f"bundle {source} is already {manifest.precision}; derive from an fp32 bundle")
    name = name or f"{source}-{precision}"
    reference = Encoder(src_dir, device="cpu", verify=False)
    with staging_dir(models_dir, name) as tmp:
        for path in src_dir.iterdir():
            if path.name != MANIFEST:
                shutil.copyfile(path, tmp / path.name)
        for tower in manifest.towers.values():
            _convert(src_dir / tower.onnx, tmp / tower.onnx, precision)
        draft = manifest.model_copy(update={"name": name, "precision": precision, "fingerprint": ""})
        atomic_write_json(tmp / MANIFEST, draft.model_dump())
        derived = Encoder(tmp, device="cpu", verify=False)
        parity = {}
        for modality in manifest.towers:
            inputs = _sample_inputs(reference, modality)
            a, b = _embed(reference, modality, inputs), _embed(derived, modality, inputs)
            cos = float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())
            parity[modality] = {"min_cosine_vs_fp32": cos, "threshold": MIN_COSINE[precision], "samples": len(a)}
            if cos < MIN_COSINE[precision]:
                raise ParityError(
                    f"{precision} {modality} tower drifts from fp32: min cosine {cos:.5f} < {MIN_COSINE[precision]}",
                    **parity,
                )
        final = draft.model_copy(
            update={
                "fingerprint": compute_fingerprint(tmp, manifest.towers),
                "parity": {**manifest.parity, precision: parity},
                "source": {**manifest.source, "derived_from": {"bundle": source, "fingerprint": manifest.fingerprint}},
                "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            }
        )
        atomic_write_json(tmp / MANIFEST, final.model_dump())
        replace_dir(tmp, models_dir / name)
    return final
