"""Image files in many formats, good and bad, made from a real photo of the demo dataset.

Users' folders hold whatever cameras, scanners and the web produce; these files stand in for
that variety, all derived from one real Fashion-MNIST image so the content is not noise.
"""

from __future__ import annotations

import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from nola_core.demo import demo_dataset_path

BASE_SIZE = (48, 32)
"""(width, height) of the base image: not square, so an EXIF rotation shows in the size."""
EXIF_ORIENTATION = 0x0112
ROTATE_90_CLOCKWISE = 6
BOMB_SIZE = (9000, 8000)
"""72 MP: over our 64 MP default, under PIL's own warning threshold (89 MP), so the refusal
must come from our check."""
GRADIENT_WIDTH = 256


@dataclass(frozen=True)
class GoodFile:
    path: Path
    size: tuple[int, int]


def base_image() -> Image.Image:
    """A real demo image, coloured and resized to BASE_SIZE (RGB)."""
    grey = Image.open(demo_dataset_path() / "unlabeled" / "img_0001.png").convert("L")
    coloured = ImageOps.colorize(grey, black=(20, 40, 160), white=(250, 220, 30))
    return coloured.resize(BASE_SIZE, Image.Resampling.BICUBIC)


def gradient_16bit() -> np.ndarray:
    """A 4-row horizontal ramp over the full 16-bit range, 0 .. 65535."""
    ramp = np.linspace(0, 65535, GRADIENT_WIDTH).round().astype(np.uint16)
    return np.tile(ramp, (4, 1))


def bomb_png_bytes(width: int, height: int) -> bytes:
    """A valid PNG header declaring a huge canvas, with almost no pixel data behind it."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def write_good_images(folder: Path) -> dict[str, GoodFile]:
    """Readable files in every supported format and awkward mode; name -> (path, size)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = base_image()
    width, height = BASE_SIZE
    files: dict[str, GoodFile] = {}

    def save(name: str, image: Image.Image, size=BASE_SIZE, **options) -> None:
        path = folder / name
        image.save(path, **options)
        files[name] = GoodFile(path, size)

    save("photo.jpg", base, quality=90)
    save("grey.png", base.convert("L"))
    save("gradient16.png", Image.fromarray(gradient_16bit()), size=(GRADIENT_WIDTH, 4))
    save("gradient32.tif", Image.fromarray(gradient_16bit().astype(np.int32)),
         size=(GRADIENT_WIDTH, 4))
    save("cmyk.jpg", base.convert("CMYK"), quality=95)

    palette = base.quantize(colors=16)
    save("palette_transparent.png", palette, transparency=int(palette.getpixel((0, 0))))

    rgba = base.convert("RGBA")
    alpha = Image.new("L", BASE_SIZE, 255)
    alpha.paste(0, (0, 0, width // 2, height))  # left half fully transparent
    rgba.putalpha(alpha)
    save("rgba.png", rgba)
    la = base.convert("L").convert("LA")
    la.putalpha(alpha)
    save("grey_alpha.png", la)

    frames = [base, ImageOps.invert(base), base.transpose(Image.Transpose.FLIP_TOP_BOTTOM)]
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=100, loop=0)

    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CLOCKWISE
    save("rotated_exif.jpg", base, size=(height, width), exif=exif, quality=95)

    save("photo.webp", base, quality=90)
    save("photo.bmp", base)
    save("photo.tiff", base)
    save("one_pixel.png", base.resize((1, 1)), size=(1, 1))
    save("name with spaces.PNG", base)
    save("näme_ünïcode_画像.png", base.rotate(180))
    shutil.copyfile(files["photo.jpg"].path, folder / "copy of photo.jpg")
    files["copy of photo.jpg"] = GoodFile(folder / "copy of photo.jpg", BASE_SIZE)
    return files


def write_bad_images(folder: Path) -> dict[str, Path]:
    """Files with image names that must not load: truncated, empty, text, decompression bomb."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    large = base_image().resize((BASE_SIZE[0] * 4, BASE_SIZE[1] * 4))
    whole = folder / "whole.tmp"
    large.save(whole, format="JPEG", quality=95)
    files["truncated.jpg"] = folder / "truncated.jpg"
    files["truncated.jpg"].write_bytes(whole.read_bytes()[: whole.stat().st_size * 6 // 10])
    whole.unlink()
    files["empty.png"] = folder / "empty.png"
    files["empty.png"].write_bytes(b"")
    files["notes.jpg"] = folder / "notes.jpg"
    files["notes.jpg"].write_text("this is a text file with an image name\n")
    files["bomb.png"] = folder / "bomb.png"
    files["bomb.png"].write_bytes(bomb_png_bytes(*BOMB_SIZE))
    return files
