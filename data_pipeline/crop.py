"""Stage 1, crop: every face of every photo -> a 192 x 192 VRN crop.

``python -m data_pipeline.crop input_dir=<photos> output_dir=<out>/crop detector=tddfa``

The VRN crop rule (:func:`crop_face`): scale the photo so that the 68-landmark box has
``sqrt(w * h) = CROP_FACE_SIZE`` (90) px, centre the box in the crop, pad with black, cut
``CROP_SIZE`` (192) px square. RGB throughout.

Writes, per face ``<image id>_f<k>`` (k: faces left to right):

* ``items/<id>.png``  the crop, (192, 192, 3) RGB;
* ``items/<id>.json`` the :class:`~vrn.geometry.transforms.CropTransform` (image px ->
  crop px), the landmarks in image px and crop px, the box, detector name and score,
  the source image (relative to ``input_dir``), its size and the fraction of crop pixels
  that came from padding.

An image with no face (or one that cannot be read) is recorded in the manifest's
``failures`` with reason ``no_face`` (``unreadable_image``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import cv2
import hydra
import numpy as np
from omegaconf import DictConfig

from vrn.conventions import CROP_FACE_SIZE, CROP_SIZE
from vrn.geometry.transforms import CropTransform
from vrn.io import ImageReadError, encode_image_rgb, read_image_rgb

from .detectors.base import FaceDetector
from .stage import Item, ItemContext, ItemFailure, Stage, safe_id

__all__ = ["crop_face", "crop_transform_for_landmarks", "warp_crop", "padding_fraction", "CropStage",
           "list_images", "IMAGE_EXTS"]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def crop_transform_for_landmarks(landmarks: np.ndarray, crop_size: int = CROP_SIZE,
                                 face_size: float = CROP_FACE_SIZE) -> CropTransform:
    """The VRN crop of a face: image px -> crop px.

    Args:
        landmarks: (68, 2) (x, y) image px (any (K, 2+) works: only their box is used).
        crop_size: crop side in px.
        face_size: ``sqrt(w * h)`` of the landmark box in crop px.
    Returns:
        a similarity (no rotation) mapping the box centre to the crop centre
        ``((crop_size - 1) / 2, (crop_size - 1) / 2)``.
    """
    p = np.asarray(landmarks, dtype=np.float64)[:, :2]
    if not np.isfinite(p).all():
        raise ValueError("landmarks contain NaN or inf")
    box = np.concatenate([p.min(0), p.max(0)])
    # a degenerate box (all points on a line) would give an infinite scale
    if min(box[2] - box[0], box[3] - box[1]) < 1e-3:
        raise ValueError(f"degenerate landmark box {box.tolist()}")
    return CropTransform.from_box(box, face_size, (crop_size, crop_size))


def warp_crop(image_rgb: np.ndarray, transform: CropTransform, border_value: int = 0) -> np.ndarray:
    """Resample ``image_rgb`` into the crop of ``transform`` (bilinear; area-averaged first
    when shrinking, so large photos do not alias). Pixels outside the photo get
    ``border_value``. Returns (H, W, 3) uint8 RGB (H, W = ``transform.size``).

    Pixel-centre convention on both sides (as OpenCV's warpAffine).
    """
    h_out, w_out = transform.size
    H, W = image_rgb.shape[:2]
    m = transform.matrix.copy()
    s = transform.scale
    img = image_rgb
    # only the part of the photo that lands in the crop (plus a margin) is resampled
    corners = np.array([[-0.5, -0.5], [w_out - 0.5, -0.5], [-0.5, h_out - 0.5], [w_out - 0.5, h_out - 0.5]])
    ic = transform.apply_inverse(corners)
    margin = 2.0 / max(s, 1e-6) + 2.0
    x0 = int(max(0, math.floor(ic[:, 0].min() - margin)))
    y0 = int(max(0, math.floor(ic[:, 1].min() - margin)))
    x1 = int(min(W, math.ceil(ic[:, 0].max() + margin) + 1))
    y1 = int(min(H, math.ceil(ic[:, 1].max() + margin) + 1))
    if x1 <= x0 or y1 <= y0:  # the crop lies entirely outside the photo
        return np.full((h_out, w_out, 3), border_value, np.uint8)
    img = img[y0:y1, x0:x1]
    m[:, 2] += m[:, :2] @ np.array([x0, y0], dtype=np.float64)  # sub-image px -> crop px
    if s < 0.75:
        # area-average down to about the final scale; x_small = (x + 0.5) * f - 0.5
        hh, ww = img.shape[:2]
        nw, nh = max(1, int(round(ww * s))), max(1, int(round(hh * s)))
        fx, fy = nw / ww, nh / hh
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
        a = m[:, :2] @ np.diag([1.0 / fx, 1.0 / fy])
        t = m[:, :2] @ np.array([0.5 / fx - 0.5, 0.5 / fy - 0.5]) + m[:, 2]
        m = np.hstack([a, t[:, None]])
    out = cv2.warpAffine(np.ascontiguousarray(img), m, (w_out, h_out), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=(border_value,) * 3)
    return out


def padding_fraction(transform: CropTransform, image_hw: tuple[int, int]) -> float:
    """Fraction of crop pixels whose centre maps outside the photo (came from padding)."""
    h_out, w_out = transform.size
    H, W = image_hw
    yy, xx = np.mgrid[0:h_out, 0:w_out]
    p = transform.apply_inverse(np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float64))
    inside = (p[:, 0] >= -0.5) & (p[:, 0] <= W - 0.5) & (p[:, 1] >= -0.5) & (p[:, 1] <= H - 0.5)
    return float(1.0 - inside.mean())


def crop_face(image_rgb: np.ndarray, landmarks68: np.ndarray, crop_size: int = CROP_SIZE,
              face_size: float = CROP_FACE_SIZE, border_value: int = 0) -> tuple[np.ndarray, CropTransform]:
    """The VRN crop of one face.

    Args:
        image_rgb: (H, W, 3) uint8 RGB photo.
        landmarks68: (68, 2) float landmarks, image px.
        crop_size, face_size: see :func:`crop_transform_for_landmarks`.
        border_value: grey level of padding outside the photo.
    Returns:
        crop_rgb: (crop_size, crop_size, 3) uint8 RGB, crop px.
        transform: image px -> crop px (``transform.apply_inverse`` maps back).
    """
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image_rgb.shape} {image_rgb.dtype}")
    t = crop_transform_for_landmarks(landmarks68, crop_size, face_size)
    return warp_crop(image_rgb, t, border_value), t


def list_images(folder: Path, exts: tuple[str, ...] = IMAGE_EXTS, recursive: bool = True) -> list[str]:
    """Image files under ``folder`` as sorted POSIX paths relative to it (hidden skipped)."""
    pattern = "**/*" if recursive else "*"
    out = []
    for p in folder.glob(pattern):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file() and p.suffix.lower() in exts:
            out.append(rel.as_posix())
    return sorted(out)


def _r(a: np.ndarray, nd: int = 4) -> list:
    return np.round(np.asarray(a, dtype=np.float64), nd).tolist()


class CropStage(Stage):
    """The crop stage (see the module doc).

    Args:
        detector: a :class:`~data_pipeline.detectors.base.FaceDetector`.
        crop_size, face_size: the VRN crop rule.
        border_value: padding grey level.
        image_exts: file extensions read from ``input_dir``.
        recursive: look into sub-folders (300W-LP keeps its images in per-set folders).
    """

    name = "crop"
    needs_manifest = False

    def __init__(self, detector: FaceDetector, crop_size: int = CROP_SIZE, face_size: float = CROP_FACE_SIZE,
                 border_value: int = 0, image_exts: list[str] | tuple[str, ...] = IMAGE_EXTS,
                 recursive: bool = True) -> None:
        self.detector = detector
        self.crop_size = int(crop_size)
        self.face_size = float(face_size)
        self.border_value = int(border_value)
        self.image_exts = tuple(str(e).lower() for e in image_exts)
        self.recursive = bool(recursive)

    def params(self) -> dict[str, Any]:
        return {"detector": self.detector.describe(), "crop_size": self.crop_size, "face_size": self.face_size,
                "border_value": self.border_value, "image_exts": list(self.image_exts),
                "recursive": self.recursive}

    def setup(self) -> None:
        self.detector.setup()

    def list_items(self, input_dir: Path, upstream: dict[str, Any] | None, out_dir: Path) -> list[Item]:
        rels = list_images(input_dir, self.image_exts, self.recursive)
        if not rels:
            from .stage import PipelineInputError

            raise PipelineInputError(f"input_dir={input_dir} holds no images ({', '.join(self.image_exts)}).")
        return [Item(safe_id(r), {"source_image": r,
                                  "path": os.path.relpath(input_dir / r, out_dir).replace(os.sep, "/")})
                for r in rels]

    def process(self, item: Item, ctx: ItemContext) -> list[dict[str, Any]]:
        path = ctx.path(item.data["path"])
        try:
            image = read_image_rgb(path)
        except ImageReadError as e:
            raise ItemFailure("unreadable_image", str(e)) from e
        dets = self.detector.detect(image, str(path))
        if not dets:
            raise ItemFailure("no_face", f"no face found by detector '{self.detector.name}'")
        H, W = image.shape[:2]
        samples = []
        for k, d in enumerate(dets):
            sid = f"{item.id}_f{k}"
            crop, t = crop_face(image, d.landmarks, self.crop_size, self.face_size, self.border_value)
            pad = padding_fraction(t, (H, W))
            lm_crop = t.apply(d.landmarks)
            record = {
                "id": sid, "source_image": item.data["source_image"], "image_size": [H, W], "face_index": k,
                "detector": self.detector.name, "score": round(d.score, 6), "box": _r(d.box),
                "landmarks_image": _r(d.landmarks), "landmarks_crop": _r(lm_crop),
                "transform": t.to_dict(), "pad_fraction": round(pad, 6),
            }
            files = {"crop": ctx.write_bytes(f"items/{sid}.png", encode_image_rgb(crop, ".png")),
                     "crop_record": ctx.write_json(f"items/{sid}.json", record),
                     "source_image": item.data["path"]}
            samples.append({"id": sid, "item": item.id, "source_image": item.data["source_image"],
                            "face_index": k, "detector": self.detector.name, "score": record["score"],
                            "pad_fraction": record["pad_fraction"], "transform": record["transform"],
                            "files": files})
        return samples


@hydra.main(version_base="1.3", config_path="../conf/pipeline", config_name="crop")
def main(cfg: DictConfig) -> None:
    from .run import run_single_stage

    run_single_stage(cfg, "crop")


if __name__ == "__main__":
    main()
