"""Files written whole or not at all, and files read from outside bounded by what they hold.

- ``write_atomic`` / ``write_json``: a temporary name in the same folder, flushed to disk,
  renamed over the old file; a storage failure is a ``StorageError`` naming the file.
- ``read_regular`` / ``read_json``: a regular file only (no symlink, FIFO, device or
  folder: opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked with ``fstat`` before a byte
  is read), at most ``limit`` bytes counted as they are read; anything else is a one-line
  ``UsageError`` naming the file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import uuid
from pathlib import Path

from mnist_cnn.errors import StorageError, UsageError

MAX_RUN_FILE = 16 << 20  # bytes of a run's JSON file (history.json of 10,000 epochs is ~2 MB)
_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device",
          stat.S_IFSOCK: "a socket"}


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` whole or not at all (temp file, fsync, rename).

    On failure the old ``path`` is untouched, no temporary file is left, and a
    ``StorageError`` names the file and the cause.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        raise StorageError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json(path: str | os.PathLike, payload) -> Path:
    return write_atomic(path, (json.dumps(payload, indent=2) + "\n").encode())


def read_regular(path: str | os.PathLike, what: str, limit: int = MAX_RUN_FILE) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``limit`` bytes.
    ``FileNotFoundError`` passes through (the caller knows what a missing file means)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UsageError(f"{path}: a symbolic link; a {what} must be a regular file") from None
        raise UsageError(f"{path}: unreadable {what} ({e.strerror or e})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UsageError(f"{path}: {_KINDS.get(stat.S_IFMT(mode), 'not a regular file')}; "
                             f"a {what} must be a regular file")
        parts, size = [], 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - size)):
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                raise UsageError(f"{path}: over {limit:,} bytes; not a {what}")
        return b"".join(parts)
    except OSError as e:
        raise UsageError(f"{path}: unreadable {what} ({e.strerror or e})") from None
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike, what: str, limit: int = MAX_RUN_FILE):
    """A run file's JSON (see ``read_regular``), or a one-line ``UsageError`` naming it
    (not JSON, or nested too deep for Python's parser)."""
    text = read_regular(path, what, limit)
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise UsageError(f"{path}: not a {what} ({type(e).__name__}: {str(e)[:80]})") from None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def json_digest(payload) -> str:
    """The digest of a JSON value, independent of its formatting (key order, spaces)."""
    return sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())
