"""Image bodies decoded within a fixed budget, whatever their headers claim.

Pillow checks an image's width and height before it decodes, but libjpeg's cost is not in the
width and height alone: a progressive JPEG keeps every DCT coefficient of the whole image in
memory (2 bytes a coefficient, at full size even when ``draft()`` scales the output), and
spends time on every block once per scan, so a 1 kB file can ask for a gigabyte and a 1 MB
file for a minute of CPU. Before Pillow sees a JPEG, ``jpeg_cost`` walks its markers (the
frame header and every scan header; the entropy-coded bytes are skipped as libjpeg skips
them) and works out what libjpeg will allocate and visit:

- ``MAX_COEFFICIENT_BYTES``: a progressive JPEG's whole-image coefficient buffers (32 MB:
  a 2000x2000 4:4:4 colour image takes 24 MB);
- ``MAX_BLOCK_VISITS``: 8x8 blocks decoded, summed over the scans (each scan visits every
  block of its components): 8 million, about 0.1 CPU-s on a 2-core Xeon (the issue's
  60,000-scan bomb asked for 3,750 million);
- ``MAX_SCANS`` scans and ``MAX_MARKERS`` markers (libjpeg's own progressions use 6-10 scans);
- only the Huffman-coded baseline, extended and progressive processes (SOF0-SOF2), with 1, 3 or
  4 components of 8 bits: what cameras, browsers and canvases write.

A PNG is bounded by its width and height (``predict.read_image``: at most ``MAX_SIDE`` a
side; Pillow inflates a PNG row by row into the image it allocates). Every decoded image
larger than ``predict.REDUCE_SIDE`` a side is box-reduced before it becomes floats, so that
preparing it stays within a few tens of megabytes too.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np

from mnist_cnn.predict import ImageError, read_image

MAX_SIDE = 2000  # pixels a side of a decoded image (a larger JPEG is decoded at a reduced scale)
MAX_COEFFICIENT_BYTES = 32 << 20
MAX_BLOCK_VISITS = 8_000_000
MAX_SCANS = 64
MAX_MARKERS = 1000
PNG, JPEG = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"

# a marker: 0xFF followed by anything but a stuffed zero, a restart marker (inside entropy-coded
# data) or another 0xFF (fill bytes before the marker)
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_STANDALONE = {0xD8, 0xD9, 0x01}  # SOI, EOI, TEM: no length
_SOF = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive"}
_OTHER_SOF = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # lossless, hierarchical, arithmetic


@dataclass
class JpegCost:
    width: int
    height: int
    components: int
    progressive: bool
    scans: int
    coefficient_bytes: int  # what libjpeg keeps for the whole image (progressive only)
    block_visits: int  # 8x8 blocks decoded, summed over the scans


def _blocks(width: int, height: int, sampling: dict[int, tuple[int, int]]) -> dict[int, int]:
    """The 8x8 blocks each component has, padded to whole MCUs as libjpeg pads them."""
    hmax = max(h for h, _ in sampling.values())
    vmax = max(v for _, v in sampling.values())
    mcus_x, mcus_y = -(-width // (8 * hmax)), -(-height // (8 * vmax))
    return {c: mcus_x * h * mcus_y * v for c, (h, v) in sampling.items()}


def jpeg_cost(data: bytes) -> JpegCost:
    """What libjpeg will allocate and decode for ``data``, read from its markers alone.
    ``ImageError`` for a JPEG this server does not decode (or a malformed header)."""
    frame, blocks, scans, visits, markers = None, {}, 0, 0, 0
    pos = 2  # after SOI
    while True:
        found = _MARKER.search(data, pos)
        if found is None:
            break  # no EOI: libjpeg pads a truncated image with zeros, at the cost already counted
        kind, pos = found.group()[1], found.end()
        markers += 1
        if markers > MAX_MARKERS:
            raise ImageError(f"a JPEG of more than {MAX_MARKERS:,} markers")
        if kind == 0xD9:  # EOI
            break
        if kind in _STANDALONE:
            continue
        if pos + 2 > len(data):
            break
        length = int.from_bytes(data[pos:pos + 2], "big")
        segment = data[pos + 2:pos + length]
        if length < 2 or len(segment) != length - 2:
            raise ImageError("a JPEG whose marker segment runs past its end")
        pos += length
        if kind in _SOF or kind in _OTHER_SOF:
            if kind in _OTHER_SOF:
                raise ImageError("a lossless, hierarchical or arithmetic-coded JPEG (only baseline and progressive "
                                 "Huffman-coded JPEGs are decoded)")
            if frame is not None:
                raise ImageError("a JPEG with two frame headers")
            if len(segment) < 6 or segment[0] != 8 or len(segment) != 6 + 3 * segment[5]:
                raise ImageError("a JPEG whose frame header is not 8-bit with its components")
            height, width, count = int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big"), segment[5]
            if count not in (1, 3, 4) or width == 0:
                raise ImageError(f"a JPEG of {count} components, {width}x{height} (1, 3 or 4 components are decoded)")
            sampling = {segment[6 + 3 * i]: (segment[7 + 3 * i] >> 4, segment[7 + 3 * i] & 15) for i in range(count)}
            if len(sampling) != count or any(not 1 <= h <= 4 or not 1 <= v <= 4 for h, v in sampling.values()):
                raise ImageError("a JPEG whose components' ids or sampling factors are malformed")
            # a height of 0 is given later by a DNL marker: count it as the largest libjpeg allows
            blocks = _blocks(width, height or 65535, sampling)
            frame = (width, height, count, kind == 0xC2)
        elif kind == 0xDA:  # SOS
            if frame is None:
                raise ImageError("a JPEG scan before its frame header")
            scans += 1
            if scans > MAX_SCANS:
                raise ImageError(f"a JPEG of more than {MAX_SCANS} scans")
            components = segment[1:1 + 2 * segment[0]:2] if segment else b""
            if not components or any(c not in blocks for c in components):
                raise ImageError("a JPEG scan of components its frame does not have")
            visits += sum(blocks[c] for c in components)
            if visits > MAX_BLOCK_VISITS:
                raise ImageError(f"a JPEG whose scans decode more than {MAX_BLOCK_VISITS:,} blocks "
                                 f"({frame[0]}x{frame[1]}, {scans}+ scans)")
    if frame is None:
        raise ImageError("a JPEG without a frame header")
    width, height, count, progressive = frame
    coefficients = 128 * sum(blocks.values()) if progressive else 0
    if coefficients > MAX_COEFFICIENT_BYTES:
        raise ImageError(f"a progressive JPEG of {width}x{height} pixels, {count} components: decoding it takes "
                         f"{coefficients / 2**20:,.0f} MB, more than the {MAX_COEFFICIENT_BYTES >> 20} MB allowed")
    return JpegCost(width, height, count, progressive, scans, coefficients, visits)


def decode_image(body: bytes) -> np.ndarray:
    """A PNG or JPEG body (recognised by its bytes) as a grayscale float array (H, W), within
    the budget above; ``ImageError`` for anything else or anything over it."""
    if body.startswith(JPEG):
        jpeg_cost(body)
    elif not body.startswith(PNG):
        raise ImageError("not a PNG or JPEG image")
    return read_image(io.BytesIO(body), formats=("PNG", "JPEG"), max_side=MAX_SIDE)
