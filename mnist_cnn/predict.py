"""Read digits from image files: ``python scripts/predict.py MODEL.keras IMAGE...``.

Each image is prepared the way MNIST's digits were: grayscale, white digit on black
(inverted when the background is light), cropped to the digit, scaled to fit a
20x20 box keeping its aspect ratio, and placed in a 28x28 field with its centre of
mass at the centre.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, UnidentifiedImageError

from mnist_cnn.errors import InputError


class ImageError(InputError):
    """An image file that cannot be read or holds no digit."""


def mnist_style(image: np.ndarray) -> np.ndarray:
    """A grayscale image (H, W), any polarity, -> float32 (28, 28) in [0, 1], MNIST-style."""
    pixels = image.astype(np.float32)
    if not np.isfinite(pixels).all():
        raise ImageError("has pixels that are not numbers (NaN or infinite)")
    pixels = (pixels - pixels.min()) / max(float(pixels.max() - pixels.min()), 1e-6)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if np.median(border) > 0.5:  # dark digit on a light background
        pixels = 1.0 - pixels
    pixels[pixels < 0.1] = 0.0  # paper texture and JPEG noise are background
    rows, cols = np.flatnonzero(pixels.any(axis=1)), np.flatnonzero(pixels.any(axis=0))
    if rows.size == 0:
        raise ImageError("no digit found (the image is blank)")
    digit = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    h, w = digit.shape
    scale = 20.0 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    digit = np.asarray(Image.fromarray(digit).resize(size, Image.Resampling.LANCZOS)).clip(0, 1)

    field = np.zeros((28, 28), np.float32)
    h, w = digit.shape
    mass = digit.sum()
    cy = (digit.sum(axis=1) @ np.arange(h)) / mass
    cx = (digit.sum(axis=0) @ np.arange(w)) / mass
    top = int(np.clip(round(13.5 - cy), 0, 28 - h))
    left = int(np.clip(round(13.5 - cx), 0, 28 - w))
    field[top : top + h, left : left + w] = digit
    return field


# Images larger than this are refused before they are decoded (Pillow's own bomb
# check only starts at 89 megapixels and aborts the whole command).
MAX_PIXELS = 40_000_000
# Decoded images larger than this a side are box-reduced before they become floats: a digit is
# scaled to 20 pixels anyway, and a 2000x2000 RGBA image as float32 arrays would take ~100 MB.
REDUCE_SIDE = 1000
_REDUCIBLE = {"L", "LA", "RGB", "RGBA", "CMYK", "I", "F"}


def read_image(source, formats: tuple[str, ...] | None = None, max_side: int | None = None) -> np.ndarray:
    """An image (a path or a binary file object) as a grayscale float array (H, W), as a
    person made it.

    ``formats``: the only Pillow decoders tried (the server allows ``("PNG", "JPEG")``,
    chosen by the file's own bytes, never by what a client says it sent). Width and height
    are read from the header and checked before anything is decoded: at most ``MAX_PIXELS``
    and ``max_side`` a side; a larger JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's
    draft mode) when that brings it within bounds. A decoded image over ``REDUCE_SIDE`` a side
    is box-reduced by a whole factor before it becomes floats.

    16-bit and 32-bit grayscale keep their full range (no clipping to 8 bits);
    1-bit, palette, CMYK and colour images are converted to gray; transparent
    pixels are composited onto the paper colour (white under dark ink, black under
    light ink), so a canvas export with ink on transparency keeps its digit.
    """
    try:
        with Image.open(source, formats=formats) as img:
            side = max_side or max(img.size)
            if img.format == "JPEG" and max(img.size) > side:
                img.draft("L", (side // 4, side // 4))  # decode at a reduced scale; size is updated
            if img.width * img.height > MAX_PIXELS or max(img.size) > side:
                limit = f"{side} pixels a side, {MAX_PIXELS:,} in all" if max_side else f"{MAX_PIXELS:,}"
                raise ImageError(f"{img.width}x{img.height} pixels, more than the {limit} this reads")
            return _gray(_reduced(img))
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        kinds = f"a {' or '.join(formats)} image" if formats else "a readable image"
        raise ImageError(f"not {kinds}") from None
    except (OSError, ValueError, SyntaxError, MemoryError) as e:
        raise ImageError(f"not a readable image ({e.__class__.__name__})") from None


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info


def _reduced(img: Image.Image) -> Image.Image:
    """``img`` box-reduced by a whole factor to at most ``REDUCE_SIDE`` a side (when larger)."""
    factor = -(-max(img.size) // REDUCE_SIDE)
    if factor <= 1:
        return img
    if _has_alpha(img) and img.mode not in ("RGBA", "LA"):  # transparency kept as an alpha band
        img = img.convert("RGBA")
    elif img.mode not in _REDUCIBLE:
        img = img.convert("I" if img.mode.startswith("I;16") else "L")
    return img.reduce(factor)


def _gray(img: Image.Image) -> np.ndarray:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # high bit depth: keep every level
        return np.asarray(img, dtype=np.float32)
    if not _has_alpha(img):
        return np.asarray(img.convert("L"), dtype=np.float32)
    rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
    alpha = rgba[..., 3] / 255.0
    gray = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    if alpha.sum() == 0:
        return gray
    ink = float((gray * alpha).sum() / alpha.sum())
    paper = 255.0 if ink < 128 else 0.0
    return alpha * gray + (1.0 - alpha) * paper


def predict_files(model, paths: list[str], top: int = 1) -> list[tuple[str, list[tuple[int, float]] | str]]:
    """For each path, in order: its ``top`` most likely (digit, probability) pairs,
    or an error message naming the file. One bad file does not stop the others."""
    outcomes, prepared = {}, {}
    for path in paths:
        try:
            prepared[path] = mnist_style(read_image(path))
        except ImageError as e:
            outcomes[path] = f"{path}: {e}"
    if prepared:
        probs = model.predict(np.stack(list(prepared.values()))[..., None], verbose=0)
        for path, p in zip(prepared, probs, strict=True):
            outcomes[path] = [(int(d), float(p[d])) for d in np.argsort(-p)[:top]]
    return [(path, outcomes[path]) for path in paths]


