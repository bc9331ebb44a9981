"""Assemble the xmodal-mini bundle: the MiniLM text tower (exported at set-up from the pip package, by
``models.registry``) plus the image and audio towers committed in ``models/mini/weights`` by the recipe. No torch here:
this only copies files, checks them against ``recipe.json`` and writes the fingerprinted manifest."""

from __future__ import annotations

from pathlib import Path

from models.bundle import ModelManifest, Tower, copy_tower, publish_bundle, verify_bundle
from models.errors import BundleError
from models.files import read_json, sha256_file, staging_dir

MINI_MODEL = "xmodal-mini"
TEXT_MODEL = "all-minilm-l6-v2"  # the frozen text tower the image and audio towers were trained against
WEIGHTS = Path(__file__).resolve().parent / "weights"
RECIPE = "recipe.json"
MEDIA = ("image", "audio")


def read_recipe(weights: Path = WEIGHTS) -> dict:
    """recipe.json, after checking that every committed ONNX file hashes to what it records."""
    path = weights / RECIPE
    if not path.is_file():
        raise BundleError(f"the xmodal-mini weights are missing ({path}); regenerate them with the recipe")
    recipe = read_json(path)
    for rel, info in recipe["files"].items():
        f = weights / rel
        if not f.is_file() or sha256_file(f) != info["sha256"]:
            raise BundleError(f"{f} is missing or does not match {RECIPE}'s sha256; reinstall or rerun the recipe")
    return recipe


def build_mini(models_dir: Path, text_bundle: Path, name: str = MINI_MODEL, weights: Path = WEIGHTS) -> ModelManifest:
    """Write ``<models_dir>/<name>``: ``text_bundle``'s text tower and the committed image and audio towers, in one
    manifest with one fingerprint; verified before it is returned."""
    recipe = read_recipe(weights)
    text_manifest = verify_bundle(text_bundle)
    text = text_manifest.towers["text"]
    towers: dict[str, Tower] = {"text": text}
    towers.update({m: Tower.model_validate(recipe["towers"][m]) for m in MEDIA})
    with staging_dir(models_dir, name) as tmp:
        copy_tower(text_bundle, text, tmp)
        for m in MEDIA:
            copy_tower(weights, towers[m], tmp)
        publish_bundle(
            tmp,
            models_dir,
            name=name,
            version=str(recipe.get("version", "1")),
            dim=text_manifest.dim,
            towers=towers,
            source={
                "kind": "xmodal-mini",
                "recipe": recipe["command"],
                "seed": recipe["seed"],
                "text_tower_from": text_manifest.name,
                "text_source": text_manifest.source,
                "text_onnx_sha256_at_training": recipe.get("text_tower", {}).get("onnx_sha256"),
                "heldout_metrics": recipe.get("metrics", {}),
            },
            parity={"text": text_manifest.parity.get("text", {}), **recipe.get("parity", {})},
        )
    return verify_bundle(models_dir / name)
