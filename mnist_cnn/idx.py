"""The IDX file format used by the MNIST distribution: read, write, validate.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), one big-endian int32 per dimension, then the data in row-major
order. MNIST uses type 0x08 (unsigned byte): images are 3-D (N, 28, 28), labels
1-D (N,). Files may be gzipped (``*.gz``). Every problem raises ``IDXError``
with the file's path and what was expected.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from mnist_cnn.errors import DataError

UBYTE = 0x08
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10

# The four files of an MNIST-style folder, by split and kind.
FILE_STEMS = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


class IDXError(DataError):
    """An IDX file that is missing, truncated or not what was expected."""


CHUNK = 1 << 20


def _open(path: Path):
    try:
        return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
    except FileNotFoundError:
        raise IDXError(f"{path}: file not found") from None
    except OSError as e:
        raise IDXError(f"{path}: cannot read ({e.strerror or e})") from None


MAX_PAYLOAD = 1 << 31  # bytes of data one IDX file may hold (MNIST's largest: 47 MB; EMNIST's: 0.6 GB)


def _read_exactly(f, size: int) -> bytes:
    """Up to ``size`` bytes (a header's few): fewer at the end of the file."""
    parts, left = [], size
    while left > 0:
        part = f.read(min(left, CHUNK))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _payload_size(f, limit: int) -> int:
    """How many bytes follow in ``f``, counted (not kept) up to ``limit`` + 1: a gzip stream's
    true size, whatever its header says, at the cost of inflating it once."""
    size = 0
    while size <= limit and (part := f.read(min(CHUNK, limit + 1 - size))):
        size += len(part)
    return size


def _read_into(f, expected: int) -> np.ndarray:
    array = np.empty(expected, np.uint8)
    view, done = memoryview(array), 0
    while done < expected and (n := f.readinto(view[done : done + CHUNK])):
        done += n
    return array[:done]


def read_idx(
    path: str | os.PathLike, ndim: int | None = None, item_shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """Read an unsigned-byte IDX file into a uint8 array, validating its header first.

    ``ndim`` (when given) is the number of dimensions the caller expects, and
    ``item_shape`` the size of every item (e.g. (28, 28) for images): both are checked
    before the payload is read. Memory follows the bytes that are really there, never the
    header's claim: a header declaring more than ``MAX_PAYLOAD`` bytes is refused; a raw
    file's size is compared with its header before anything is read; a ``.gz`` file is
    inflated once to count its bytes (kept nowhere) and read only when they match.
    """
    path = Path(path)
    try:
        with _open(path) as f:
            shape, header_size = _read_header(f, path, ndim, item_shape)
            expected = math.prod(shape)  # Python ints: no overflow
            if expected > MAX_PAYLOAD:
                raise IDXError(f"{path}: header says shape {shape} ({expected:,} bytes of data), more than the "
                               f"{MAX_PAYLOAD:,} bytes an IDX file may hold here")
            if isinstance(f, gzip.GzipFile):
                found = _payload_size(f, expected)
            else:
                found = os.fstat(f.fileno()).st_size - header_size
            if found < expected:
                raise IDXError(
                    f"{path}: truncated: header says shape {shape} ({header_size + expected} bytes), "
                    f"file has {header_size + found} bytes"
                )
            if found > expected:
                raise IDXError(
                    f"{path}: has trailing bytes: header says shape {shape} ({header_size + expected} bytes)"
                )
        with _open(path) as f:
            f.seek(header_size)
            payload = _read_into(f, expected)
        if payload.size < expected:  # the file changed between the two reads
            raise IDXError(f"{path}: changed while it was read")
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise IDXError(f"{path}: not a valid gzip file ({e})") from None
    except OSError as e:
        raise IDXError(f"{path}: cannot read ({e.strerror or e})") from None
    return payload.reshape(shape)


def _read_header(f, path: Path, ndim: int | None, item_shape: tuple[int, ...] | None) -> tuple[tuple[int, ...], int]:
    """The shape an IDX header declares, and the header's size, checked as ``read_idx`` says."""
    head = _read_exactly(f, 4)
    if len(head) < 4:
        raise IDXError(f"{path}: truncated: {len(head)} bytes, shorter than the 4-byte IDX header")
    zero, dtype, file_ndim = struct.unpack(">HBB", head)
    if zero != 0 or dtype != UBYTE or file_ndim == 0:
        raise IDXError(
            f"{path}: wrong magic number 0x{head.hex()}: expected an unsigned-byte IDX file "
            f"(0x0000080N, e.g. 0x00000803 for images, 0x00000801 for labels)"
        )
    if ndim is not None and file_ndim != ndim:
        raise IDXError(f"{path}: has {file_ndim} dimensions, expected {ndim}")
    header_size = 4 + 4 * file_ndim
    dims = _read_exactly(f, header_size - 4)
    if len(dims) < header_size - 4:
        raise IDXError(f"{path}: truncated inside the header ({4 + len(dims)} of {header_size} bytes)")
    shape = struct.unpack(f">{file_ndim}I", dims)
    if item_shape is not None and shape[1:] != item_shape:
        kind = "images" if len(item_shape) == 2 else "items"
        size = "x".join(map(str, shape[1:]))
        raise IDXError(f"{path}: {kind} are {size}, expected {'x'.join(map(str, item_shape))}")
    if shape[0] == 0:
        raise IDXError(f"{path}: holds 0 items; a split needs at least one")
    return shape, header_size


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz)."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, UBYTE, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def find_file(folder: str | os.PathLike, split: str, kind: str) -> Path:
    """The path of one of the four standard files in ``folder``, raw or gzipped."""
    folder = Path(folder)
    stem = FILE_STEMS[(split, kind)]
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise IDXError(f"{folder}: missing {stem} (or {stem}.gz)")


def read_split(folder: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of one split of an IDX folder."""
    images_path = find_file(folder, split, "images")
    labels_path = find_file(folder, split, "labels")
    images = read_idx(images_path, ndim=3, item_shape=IMAGE_SHAPE)
    labels = read_idx(labels_path, ndim=1)
    if len(images) != len(labels):
        raise IDXError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        bad = int(np.argmax(labels >= NUM_CLASSES))
        raise IDXError(f"{labels_path}: label {labels[bad]} at index {bad} is outside 0-9")
    return images, labels
