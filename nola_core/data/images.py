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


REDUCED_JPEG_DECODE = "jpeg-dct-scaled-to-resize/1"
"""Names `load_rgb(..., min_side=...)`'s decoding in the keys of artifacts computed with it:
their pixels differ a little from a full decode's (BENCHMARKS.md, "Decoding large photos")."""


def load_rgb(
    path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, *, data: bytes | None = None,
    min_side: int | None = None,
) -> Image.Image:
    """Decode an image file into a new 8-bit RGB image, upright as its EXIF tag says.

    `data`, when given, is the file's content already read by the caller (the path then only
    names the file in errors), so a scan can hash and decode with one read. `min_side`, when
    given, is the size the caller resizes the shorter side to: a JPEG then decodes at 1/2, 1/4
    or 1/8 scale in the DCT (PIL's `draft`), keeping the shorter side at least `min_side` and
    the pixel grid the resize would give a full decode (`_reduced_scale`), so a 12-megapixel
    photo costs a fraction of a full decode and of the downscale after it (BENCHMARKS.md,
    "Decoding large photos"; `REDUCED_JPEG_DECODE` names it in artifact keys).
    """
    return _decode(Path(path), data, max_pixels, reduced=False, min_side=min_side)


def check_image(
    path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, *, data: bytes | None = None
) -> None:
    """Raise `ImageLoadError` unless the file fully decodes.

    It really decodes (a header check misses truncated files) but lets JPEG decode at 1/8
    scale, which still reads every byte of the entropy-coded stream and is several times faster.
    """
    _decode(Path(path), data, max_pixels, reduced=True)


def _decode(path: Path, data: bytes | None, max_pixels: int, *, reduced: bool,
            min_side: int | None = None) -> Image.Image:
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
            elif min_side and im.format == "JPEG" and (k := _reduced_scale(width, height, min_side)) > 1:
                im.draft(None, (width // k, height // k))  # PIL picks 1/k for this request
            im.load()  # first frame only: Image.open leaves animated files on frame 0
            picture = im
            if min_side and im.size != (width, height):  # decoded reduced for `min_side`
                crop = _resize_grid_crop(im.size, width, height, min_side)
                if crop is not None and crop != im.size:
                    picture = im.crop((0, 0, *crop))
            upright = ImageOps.exif_transpose(picture)
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


def _reduced_scale(width: int, height: int, min_side: int) -> int:
    """The largest k in (8, 4, 2) for which a JPEG decoded at 1/k keeps its shorter side at
    least `min_side` and, cropped to `_resize_grid_crop`, resizes like the full image; 1 if none."""
    for k in (8, 4, 2):
        decoded = (-(-width // k), -(-height // k))  # libjpeg's scaled size: ceil(side / k)
        if min(decoded) >= min_side and _resize_grid_crop(decoded, width, height, min_side) is not None:
            return k
    return 1


def _resize_grid_crop(decoded: tuple[int, int], width: int, height: int, min_side: int) -> tuple[int, int] | None:
    """The size to crop a 1/k-scale decode to so that resizing its shorter side to `min_side`
    gives the size a full decode gives (torchvision's rule: long = int(min_side * long / short)).

    At 1/k a side has ceil(side / k) pixels, the last from a partial block, so the aspect ratio
    is slightly off and the resize can give one pixel more on the long side (a 2133 x 1600 photo
    at 1/4 is 534 x 400: 299 x 224 instead of 298 x 224); the centre crop then samples a
    half-pixel-shifted grid, 2.4 grey levels of mean difference on grainy pictures instead of
    0.5. Keeping or dropping that partial pixel fixes it; None when neither does."""
    k = round(width / decoded[0])

    def resized(w: int, h: int) -> tuple[int, int]:
        long = int(min_side * max(w, h) / min(w, h))
        return (min_side, long) if w <= h else (long, min_side)

    for w in sorted({width // k, decoded[0]}):  # whole blocks first
        for h in sorted({height // k, decoded[1]}):
            if resized(w, h) == resized(width, height):
                return w, h
    return None


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
