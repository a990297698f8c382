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
    "check_encoded_complete",
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


_JPEG_SOI, _JPEG_SOS, _JPEG_EOI = b"\xff\xd8", b"\xff\xda", b"\xff\xd9"
_PNG_SIG, _PNG_IEND = b"\x89PNG\r\n\x1a\n", b"IEND"


def check_encoded_complete(data: bytes | np.ndarray) -> None:
    """Raise :class:`ImageReadError` for empty bytes, a JPEG cut before its end marker or a
    PNG without its ``IEND`` chunk.

    OpenCV decodes such files into a partly grey image and only prints a libjpeg / libpng
    warning on stderr; this check turns that case into an error. A JPEG is complete when an
    end-of-image marker (FF D9) follows its last start-of-scan marker (FF DA): an embedded
    EXIF thumbnail's end marker comes before the main scan and does not count. Other formats
    are left to the decoder.
    """
    b = np.asarray(data, dtype=np.uint8).tobytes() if not isinstance(data, bytes) else data
    if not b:
        raise ImageReadError("the image data is empty (0 bytes)")
    if b.startswith(_JPEG_SOI):
        sos = b.rfind(_JPEG_SOS)
        if sos < 0 or b.find(_JPEG_EOI, sos + 2) < 0:
            raise ImageReadError(f"the JPEG data is truncated ({len(b)} bytes, no end-of-image marker)")
    elif b.startswith(_PNG_SIG) and b.rfind(_PNG_IEND) < 0:
        raise ImageReadError(f"the PNG data is truncated ({len(b)} bytes, no IEND chunk)")


def read_image_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB.

    Raises:
        ImageReadError: naming the file: missing, empty (0 bytes), truncated (JPEG / PNG:
            :func:`check_encoded_complete`) or not decodable.
    """
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"Image not found: {p}. Check the path.")
    data = np.fromfile(str(p), dtype=np.uint8)
    try:
        check_encoded_complete(data)
        img = cv2.imdecode(data, cv2.IMREAD_COLOR)
    except ImageReadError as e:
        raise ImageReadError(f"Cannot read image {p}: {e}. Replace or remove the file.") from e
    except cv2.error as e:
        raise ImageReadError(f"Cannot decode image {p}: {e}. Replace or remove the file.") from e
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
    """Decode encoded image bytes to (H, W, 3) uint8 RGB (:class:`ImageReadError` when they
    do not decode; callers that know where the bytes come from add that to the message)."""
    try:
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as e:
        raise ImageReadError(f"Cannot decode image bytes ({e})") from e
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
