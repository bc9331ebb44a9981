"""Checksums of an index version's files: written into its manifest at build time, checked before the version is
served and by `xmodal index verify`, so a damaged file is refused rather than answered from."""

from __future__ import annotations

from pathlib import Path

from indexer.layout import MANIFEST, IndexManifest
from models.errors import BundleError
from models.files import sha256_file


def file_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (the manifest itself aside), by path relative to it."""
    return {
        path.relative_to(folder).as_posix(): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.relative_to(folder).as_posix() != MANIFEST
    }


def checksum_problems(folder: Path, expected: dict[str, str]) -> list[str]:
    """What differs between ``folder``'s files and the checksums its manifest lists: changed, missing, extra."""
    found = file_checksums(folder)
    problems = [f"{rel} is missing" for rel in sorted(set(expected) - set(found))]
    problems += [
        f"{rel} is damaged (sha256 differs)" for rel in sorted(expected) if rel in found and found[rel] != expected[rel]
    ]
    problems += [f"{rel} is not in the manifest" for rel in sorted(set(found) - set(expected))]
    return problems


def check_version_files(folder: Path, manifest: IndexManifest) -> None:
    """BundleError unless every file of the version matches its manifest's checksum (versions written before
    checksums existed have none to check)."""
    problems = checksum_problems(folder, manifest.checksums) if manifest.checksums else []
    if problems:
        raise BundleError(
            f"index {manifest.name!r} version {manifest.version} is damaged: {'; '.join(problems[:5])}"
            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
            + "; publish another version or rebuild it"
        )


def consistency_problems(manifest: IndexManifest, dense_dim: int, dense_rows: int, item_rows: int) -> list[str]:
    """Where the loaded files disagree with the manifest or with each other."""
    problems = []
    if dense_dim != manifest.dim or manifest.model.get("dim", manifest.dim) != manifest.dim:
        problems.append(
            f"FAISS dimension {dense_dim}, manifest dim {manifest.dim}, model dim {manifest.model.get('dim')}"
        )
    if not dense_rows == item_rows == sum(manifest.counts.values()):
        problems.append(f"FAISS holds {dense_rows} vectors, items store {item_rows}, manifest counts {manifest.counts}")
    return problems
