"""Atomic, durable file writes and content hashing, shared by model and index bundles."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder below ``root`` (and ``root``), so a rename after it is durable."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb+") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))


def _default_mode(mode: int) -> int:
    """``mode`` less the process umask: what open() would give. mkstemp/mkdtemp use 0600/0700, which would
    make bundles unreadable to another user (the Docker image's runtime user reads what root built)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _default_mode(0o666))
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def jsonl_rows(path: Path, what: str = "file") -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for each non-blank line of a JSONL file; InvalidInput names the bad line."""
    from models.errors import InvalidInput

    if not path.is_file():
        raise InvalidInput(f"no {what} at {path}")
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"{path}:{n}: not JSON ({exc.msg})") from exc


def sha256_file(path: Path, h: Any = None) -> str:
    h = h or hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def staging_dir(parent: Path, final_name: str) -> Iterator[Path]:
    """A temporary folder beside the final one; removed if the block fails, left for the caller to rename.

    Staging folders start with ``.tmp-`` so that listings skip them and a crash leaves nothing that
    looks published; they carry the writer's pid, so ``remove_stale_staging`` can tell a dead writer's
    leftovers from a running one's work.
    """
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final_name}-pid{os.getpid()}-", dir=parent))
    os.chmod(tmp, _default_mode(0o777))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_STAGING_PID = re.compile(r"^\.(?:tmp|old)-.*-pid(\d+)-")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_staging(parent: Path) -> list[Path]:
    """Remove what writers killed mid-way left in ``parent`` (``.tmp-*``/``.old-*`` folders whose process is gone);
    the folders of writers still running (or of unknown writers) are kept. Returns what was removed."""
    removed = []
    if not parent.is_dir():
        return removed
    for path in parent.iterdir():
        match = _STAGING_PID.match(path.name)
        if match and path.is_dir() and not process_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written staging folder to ``final``, replacing an existing one as atomically as POSIX
    allows (the old folder is renamed aside first, then removed)."""
    fsync_tree(tmp)
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-pid{os.getpid()}-")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
