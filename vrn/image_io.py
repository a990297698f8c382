"""Image I/O at the OpenCV boundary: the only place BGR <-> RGB conversion happens."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from vrn.atomic_write import atomic_write

__all__ = [
    "read_image_rgb",
    "write_image_rgb",
    "encode_image_rgb",
    "decode_image_rgb",
    "check_rgb_image",
    "list_image_files",
    "IMAGE_EXTS",
    "ImageReadError",
]

#: file extensions treated as images when listing a folder (lower case)
IMAGE_EXTS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ImageReadError(ValueError):
    """An image file that is missing or cannot be decoded."""


def check_rgb_image(image_rgb: np.ndarray, what: str = "image") -> None:
    """Raise ValueError unless ``image_rgb`` is an (H, W, 3) uint8 RGB array."""
    a = np.asarray(image_rgb)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"{what} must be an (H, W, 3) uint8 RGB array, got shape {tuple(a.shape)} {a.dtype}")


def read_image_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB. Raises ImageReadError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"Image not found: {p}. Check the path.")
    data = np.fromfile(str(p), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if img is None:
        raise ImageReadError(f"Cannot decode image {p}: not a readable image file (jpg, png, bmp, ...).")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def encode_image_rgb(image_rgb: np.ndarray, ext: str = ".png", quality: int = 95) -> bytes:
    """Encode (H, W, 3) uint8 RGB, or (H, W) uint8 grey, to bytes (".png" lossless or
    ".jpg" with ``quality``)."""
    a = np.ascontiguousarray(image_rgb)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if ext.lower() in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, a if a.ndim == 2 else cv2.cvtColor(a, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"OpenCV could not encode an image of shape {a.shape} as {ext}")
    return buf.tobytes()


def decode_image_rgb(data: bytes | np.ndarray) -> np.ndarray:
    """Decode encoded image bytes to (H, W, 3) uint8 RGB."""
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ImageReadError("Cannot decode image bytes (corrupt packed sample?)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def write_image_rgb(path: str | os.PathLike, image_rgb: np.ndarray, quality: int = 95) -> None:
    """Write (H, W, 3) uint8 RGB atomically; the format follows the file extension."""
    atomic_write(path, encode_image_rgb(image_rgb, Path(path).suffix or ".png", quality))


def list_image_files(
    folder: str | os.PathLike, exts: tuple[str, ...] = IMAGE_EXTS, recursive: bool = True
) -> list[str]:
    """Image files under ``folder`` as sorted POSIX paths relative to it (hidden skipped)."""
    folder = Path(folder)
    pattern = "**/*" if recursive else "*"
    out = []
    for p in folder.glob(pattern):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file() and p.suffix.lower() in exts:
            out.append(rel.as_posix())
    return sorted(out)
