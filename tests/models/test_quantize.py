"""int8 and fp16 bundles derived from the real MiniLM bundle: parity against fp32, refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from models.bundle import DEFAULT_MODEL, verify_bundle
from models.encoder import Encoder
from models.errors import InvalidInput
from models.quantize import derive

pytest.importorskip("onnx", reason="conversion needs the onnx package (`export` extra)")
TEXTS = ["an aeroplane wing in a wind tunnel", "a bowl of soup", "jazz piano late at night", "x"]


@pytest.fixture(scope="module")
def bundles(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("q")
    shutil.copytree(models_dir / DEFAULT_MODEL, d / DEFAULT_MODEL)
    return d


@pytest.mark.parametrize(("precision", "min_cos"), [("int8", 0.99), ("fp16", 0.999)])
def test_derived_bundle_stays_close_to_fp32(bundles: Path, encoder: Encoder, precision: str, min_cos: float) -> None:
    m = derive(bundles, DEFAULT_MODEL, precision)
    assert m.name == f"{DEFAULT_MODEL}-{precision}" and m.precision == precision
    assert m.parity[precision]["text"]["min_cosine_vs_fp32"] >= min_cos
    assert m.source["derived_from"]["fingerprint"] == encoder.fingerprint
    assert verify_bundle(bundles / m.name).fingerprint == m.fingerprint != encoder.fingerprint
    derived = Encoder(bundles / m.name, device="cpu")
    a, b = encoder.encode_text(TEXTS), derived.encode_text(TEXTS)  # texts the parity check did not see
    assert ((a * b).sum(1) >= min_cos - 0.005).all()
    assert np.allclose(np.linalg.norm(b, axis=1), 1, atol=1e-3)
    size = (bundles / m.name / "text.onnx").stat().st_size
    assert size < 0.8 * (bundles / DEFAULT_MODEL / "text.onnx").stat().st_size


def test_refusals(bundles: Path) -> None:
    with pytest.raises(InvalidInput, match="precision"):
        derive(bundles, DEFAULT_MODEL, "int4")  # type: ignore[arg-type]
    derive(bundles, DEFAULT_MODEL, "int8", name="once")
    with pytest.raises(InvalidInput, match="already int8"):
        derive(bundles, "once", "fp16")
