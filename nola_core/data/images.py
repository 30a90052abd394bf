"""Reading user images into 8-bit RGB, whatever format, mode or orientation they arrive in.

User folders hold phone photos (EXIF-rotated), scans (16-bit, CMYK), web graphics (palette,
alpha, animated GIF) and the odd broken file. Everything downstream assumes RGB uint8, so
every conversion happens here, and every failure becomes one `ImageLoadError` naming the file.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
DEFAULT_MAX_PIXELS = 64_000_000
"""Refuse images larger than this (width × height) before decoding: a small file can declare
a huge canvas (a decompression bomb) and exhaust memory. 64 MP fits any camera photo."""

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_SIXTEEN_BIT_MAX = 65535
_BACKGROUND = (255, 255, 255, 255)
"""Transparent pixels are shown on white, as browsers and file viewers do."""


class ImageLoadError(ValueError):
    """An image file that cannot be decoded; the message names the path and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def is_image_path(path: str | Path) -> bool:
    """True when the file name has one of the `IMAGE_SUFFIXES` (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def load_rgb(
    path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, *, data: bytes | None = None
) -> Image.Image:
    """Decode an image file into a new 8-bit RGB image, upright as its EXIF tag says.

    `data`, when given, is the file's content already read by the caller (the path then only
    names the file in errors), so a scan can hash and decode with one read.
    """
    return _decode(Path(path), data, max_pixels, reduced=False)


def check_image(
    path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, *, data: bytes | None = None
) -> None:
    """Raise `ImageLoadError` unless the file fully decodes.

    It really decodes (a header check misses truncated files) but lets JPEG decode at 1/8
    scale, which still reads every byte of the entropy-coded stream and is several times faster.
    """
    _decode(Path(path), data, max_pixels, reduced=True)


def _decode(path: Path, data: bytes | None, max_pixels: int, *, reduced: bool) -> Image.Image:
    source = io.BytesIO(data) if data is not None else path
    try:
        with Image.open(source) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise ImageLoadError(
                    path,
                    f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels} "
                    "(possible decompression bomb); not decoded",
                )
            if reduced and im.format == "JPEG":
                im.draft(None, (max(1, width // 8), max(1, height // 8)))
            im.load()  # first frame only: Image.open leaves animated files on frame 0
            upright = ImageOps.exif_transpose(im)
            rgb = _to_rgb(upright)
            return rgb.copy() if rgb is im else rgb
    except ImageLoadError:
        raise
    except UnidentifiedImageError as error:
        empty = data == b"" if data is not None else path.is_file() and path.stat().st_size == 0
        reason = "empty file" if empty else "not an image file PIL recognises"
        raise ImageLoadError(path, reason) from error
    except Exception as error:  # PIL's decoders raise many types on malformed input
        raise ImageLoadError(
            path, f"cannot read image ({type(error).__name__}: {error})"
        ) from error


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without clipping high bit depths or losing alpha."""
    if im.mode in _SIXTEEN_BIT_MODES or im.mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(im)), mode="L").convert("RGB")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND)
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode == "RGB":
        return im
    return im.convert("RGB")


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map high-bit-depth grey values to 0..255.

    Values within 0..65535 are treated as 16-bit (PNG/TIFF/PGM store 16-bit grey this way,
    PIL even loads some of it as 32-bit "I"); anything else (signed or float data) is
    stretched from its own minimum to maximum, since there is no standard full scale for it.
    """
    is_integer = values.dtype.kind in "iu"
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if is_integer and low >= 0 and high <= _SIXTEEN_BIT_MAX:
        scaled = values / _SIXTEEN_BIT_MAX
    elif high > low:
        scaled = (values - low) / (high - low)
    else:
        scaled = np.zeros_like(values)
    return np.round(scaled * 255).astype(np.uint8)
