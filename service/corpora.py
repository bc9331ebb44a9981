"""Corpus paths a rebuild job may read: only below the configured corpora root. Paths are resolved (symlinks and
`..` included) before they are compared, so neither can lead outside it; a JSONL corpus's media paths are held to
the same rule, so a job cannot index (and the media routes then serve) files from elsewhere."""

from __future__ import annotations

from pathlib import Path

from indexer.corpus import MEDIA, CorpusItem
from models.errors import InvalidInput


def resolve_corpus(root: Path, given: str) -> Path:
    """``given`` (relative to ``root``, or absolute) as a resolved path below ``root``, or an InvalidInput."""
    if not given.strip() or "\0" in given:
        raise InvalidInput("corpus: give a path of a JSONL file or a folder below the corpora root")
    base = root.resolve()
    try:
        path = (base / given).resolve()  # an absolute `given` replaces base
        exists = path.exists()
    except OSError as exc:  # a name longer than the file system takes, a loop of links
        raise InvalidInput(f"corpus: not a path this system can open ({exc.strerror})") from None
    if not path.is_relative_to(base):
        raise InvalidInput(
            f"corpus {given!r} is outside the corpora root {base} (XMODAL_CORPORA_DIR); put the corpus there"
        )
    if not exists:
        raise InvalidInput(f"corpus {given!r} does not exist below the corpora root {base}")
    return path


def check_media_under(root: Path, items: list[CorpusItem]) -> None:
    """Refuse a corpus whose items name media files outside ``root`` (e.g. `"image": "../../etc/x.png"`)."""
    base = root.resolve()
    for item in items:
        for modality in MEDIA:
            media = getattr(item, modality)
            if media is not None and not Path(media).resolve().is_relative_to(base):
                raise InvalidInput(
                    f"item {item.id!r} ({item.source}): its {modality} {str(media)!r} is outside the corpora "
                    f"root {base}"
                )
