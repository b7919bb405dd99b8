"""Decoding one patch, with the input policy written down in one place.

Policy: grayscale, palette, CMYK and RGBA images are converted to RGB with a warning (alpha is
dropped; H&E patches carry no meaning in it); 16-bit grey keeps its high byte (clipping at 255 would turn it white);
32-bit integer or float images are rejected (no agreed 8-bit scale). An image whose size differs from the expected patch
size is rejected: silently resizing would change the apparent size of the mitotic figure, so the
user must crop it centred on the figure, or set ``patch_size`` for a dataset of another size.
A file that cannot be decoded is rejected with its path.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mitobench.errors import MitobenchError


class ImageModeWarning(UserWarning):
    """An image was converted to RGB."""


def decode_patch(path: str | Path, patch_size: int | None = 128) -> np.ndarray:
    """Return the image at ``path`` as a ``(H, W, 3)`` uint8 RGB array; a conversion is an ``ImageModeWarning``."""
    array, converted = read_patch(path, patch_size)
    if converted:
        warnings.warn(converted, ImageModeWarning, stacklevel=2)
    return array


def read_patch(path: str | Path, patch_size: int | None = 128) -> tuple[np.ndarray, str | None]:
    """``decode_patch`` without the warning, for callers decoding in threads (``warnings.catch_warnings`` is not
    thread-safe): the array and what was converted, or None."""
    converted = None
    try:
        with Image.open(path) as img:
            if patch_size is not None and img.size != (patch_size, patch_size):  # before decoding: it may be a slide
                raise _wrong_size(path, img.size, patch_size)
            img.load()
            if img.mode == "I" and img.format == "PNG":  # 16-bit grey as Pillow < 10.3 opens it (PNG has no int32)
                img = img.convert("I;16")  # lossless: PNG's 16-bit samples lie in 0..65535
            if img.mode in ("I", "F"):
                kind = "integer" if img.mode == "I" else "floating-point"
                raise MitobenchError(f"{path}: a 32-bit {kind} image (PIL mode {img.mode}) has no agreed 8-bit scale. "
                                     "Save it as an 8-bit RGB image (PNG or JPEG).")
            if img.mode.startswith("I;16"):  # 16-bit grey: its high byte, not values clipped at 255 (all white)
                grey = (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8)
                converted = f"{path}: converted from 16-bit grey ({img.mode}) to 8-bit RGB"
                array = np.repeat(grey[..., None], 3, axis=2)
            else:
                if img.mode != "RGB":
                    converted = f"{path}: converted from {img.mode} to RGB"
                    img = img.convert("RGB")
                array = np.asarray(img, dtype=np.uint8)
    except Image.DecompressionBombError as exc:  # raised by Image.open itself, before any size check of ours
        raise MitobenchError(f"{path}: far too large for a patch ({exc}). A whole-slide image? Classify the figures on "
                             "it with `mitobench predict RUN SLIDE --points P`.") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise MitobenchError(f"{path}: cannot decode this image ({exc}). Replace or remove the file.") from exc
    if patch_size is not None and array.shape[:2] != (patch_size, patch_size):
        raise _wrong_size(path, (array.shape[1], array.shape[0]), patch_size)
    return array, converted


def _wrong_size(path: str | Path, size: tuple[int, int], patch_size: int) -> MitobenchError:
    slide = (" A whole-slide image? Classify the figures on it with `mitobench predict RUN SLIDE --points P`."
             if max(size) > 4096 else "")
    return MitobenchError(f"{path}: image is {size[0]}x{size[1]} px but patches must be {patch_size}x{patch_size}. "
                          f"Crop it centred on the mitotic figure, or set patch_size for a dataset of another size.{slide}")
