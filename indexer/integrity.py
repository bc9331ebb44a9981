"""Checksums of a segment's files: written into its manifest when it is written, checked before a version that
lists it is served and by `xmodal index verify`, so a damaged file is refused rather than answered from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from indexer.layout import MANIFEST, SegmentManifest
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


def check_segment_files(folder: Path, manifest: SegmentManifest) -> None:
    """BundleError unless every file of the segment matches its manifest's checksum."""
    problems = checksum_problems(folder, manifest.checksums)
    if problems:
        raise BundleError(
            f"segment {manifest.id} is damaged: {'; '.join(problems[:5])}"
            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
            + "; publish another version or rebuild it"
        )


def consistency_problems(manifest: SegmentManifest, indexes: dict[str, Any], item_rows: int) -> list[str]:
    """Where a segment's loaded files disagree with its manifest or with each other."""
    problems = []
    if manifest.model.dim != manifest.dim:
        problems.append(f"manifest dim {manifest.dim}, model dim {manifest.model.dim}")
    for modality, index in indexes.items():
        if index.d != manifest.dim:
            problems.append(f"{modality} FAISS dimension {index.d}, manifest dim {manifest.dim}")
        if index.ntotal != manifest.counts.get(modality):
            problems.append(f"{modality} FAISS holds {index.ntotal} vectors, the manifest counts {manifest.counts}")
    if item_rows != manifest.size:
        problems.append(f"items store holds {item_rows} rows, the manifest counts {manifest.counts}")
    return problems
