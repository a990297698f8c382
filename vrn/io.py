"""Image I/O at the OpenCV boundary: the only place BGR <-> RGB conversion happens."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import cv2
import numpy as np

__all__ = ["read_image_rgb", "write_image_rgb", "encode_image_rgb", "decode_image_rgb", "atomic_write_bytes",
           "ImageReadError"]


class ImageReadError(ValueError):
    """An image file that is missing or cannot be decoded."""


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
    """Encode (H, W, 3) uint8 RGB to bytes (".png" lossless or ".jpg" with ``quality``)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if ext.lower() in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, cv2.cvtColor(np.ascontiguousarray(image_rgb), cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"OpenCV could not encode an image of shape {image_rgb.shape} as {ext}")
    return buf.tobytes()


def decode_image_rgb(data: bytes | np.ndarray) -> np.ndarray:
    """Decode encoded image bytes to (H, W, 3) uint8 RGB."""
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ImageReadError("Cannot decode image bytes (corrupt packed sample?)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder (mode
    honours the umask), fsync, then ``os.replace``. A reader never sees half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / f".{p.name}.{uuid.uuid4().hex[:12]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return p


def write_image_rgb(path: str | os.PathLike, image_rgb: np.ndarray, quality: int = 95) -> None:
    """Write (H, W, 3) uint8 RGB atomically; the format follows the file extension."""
    atomic_write_bytes(path, encode_image_rgb(image_rgb, Path(path).suffix or ".png", quality))
