"""Read digits from image files: ``python scripts/predict.py MODEL.keras IMAGE...``.

Each image is prepared the way MNIST's digits were: grayscale, white digit on black
(inverted when the background is light), cropped to the digit, scaled to fit a
20x20 box keeping its aspect ratio, and placed in a 28x28 field with its centre of
mass at the centre.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mnist_cnn.errors import InputError
from mnist_cnn.model import load_cnn


class ImageError(InputError):
    """An image file that cannot be read or holds no digit."""


def mnist_style(image: np.ndarray) -> np.ndarray:
    """A grayscale image (H, W), any polarity, -> float32 (28, 28) in [0, 1], MNIST-style."""
    pixels = image.astype(np.float32)
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


def read_image(path: str | Path) -> np.ndarray:
    """An image file as a grayscale array (ImageError otherwise)."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L"))
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"not a readable image ({e.__class__.__name__})") from None


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="predict.py", description="Predict the digit in each image file.")
    p.add_argument("model", metavar="MODEL.keras")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--top", type=int, default=1, help="show the N most likely digits")
    args = p.parse_args(argv)
    try:
        model = load_cnn(args.model)
    except InputError as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        return 2
    failed = False
    for path, outcome in predict_files(model, args.images, args.top):
        if isinstance(outcome, str):
            print(f"predict.py: error: {outcome}", file=sys.stderr)
            failed = True
        else:
            print(f"{path}: " + ", ".join(f"{digit} ({prob:.4f})" for digit, prob in outcome))
    return 2 if failed else 0
