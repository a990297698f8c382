"""Stage 1, crop: every face of every photo -> a 192 x 192 VRN crop.

``python -m data_pipeline.crop input_dir=<photos> output_dir=<out>/crop detector=tddfa``

The VRN crop rule (:func:`vrn.geometry.crop.crop_face`): scale the photo so that the
68-landmark box has ``sqrt(w * h) = face_size`` (``crop.face_size``, default
``CROP_FACE_SIZE`` = 90) px, centre the box in the crop, fill the margin outside the photo
(``crop.border``: ``constant`` with ``crop.border_value``, the default, black; ``reflect``,
``replicate``, ``blur_reflect``; see :mod:`vrn.geometry.crop`), cut ``crop_size``
(default ``CROP_SIZE`` = 192) px square. RGB throughout. Both numbers are recorded in
``stage.json`` / the manifest's ``params``; ``pack`` copies them into the dataset's layout.

``crop.source_roi_px=N`` (``--config-name aflw`` sets 120): the input photos are already
3DDFA-style face crops of N x N px (the AFLW crops). Recorded, and copied by ``pack`` into the
layout (``VolumeLayout.source_roi_px``), so a model trained on them makes its inference crops
the same way (:func:`vrn.geometry.crop.crop_for_layout`); a photo of another size is skipped
with reason ``not_source_roi_size``.

``crop.refuse_eval_sets=true`` (set by ``--config-name aflw``) stops before any image is
processed when the input folder is the AFLW2000-3D benchmark (evaluation only, never training /
validation / model selection): a folder named like ``aflw2000_3d``, or any image with a ``.mat`` beside it
that holds ``pt3d_68`` (AFLW2000-3D's ground truth).

Writes, per face ``<image id>_f<k>`` (k: faces left to right):

* ``items/<id>.png``  the crop, (192, 192, 3) RGB;
* ``items/<id>.json`` the :class:`~vrn.geometry.transforms.CropTransform` (image px ->
  crop px), the landmarks in image px and crop px, the box, detector name and score,
  the source image (relative to ``input_dir``), its size, the fraction of crop pixels
  that came from padding and (when not the default ``constant``) the margin fill ``border``.

An image with no face (or one that cannot be read: missing, empty, a JPEG / PNG cut
short, not decodable) is recorded in the manifest's ``failures`` with reason ``no_face``
(``unreadable_image``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import scipy.io as sio
from omegaconf import DictConfig

from data_pipeline.run import run_single_stage
from data_pipeline.stage import Item, ItemContext, ItemFailure, PipelineInputError, Stage, safe_id
from vrn.conventions import CROP_FACE_SIZE, CROP_SIZE
from vrn.detectors.base import FaceDetector
from vrn.geometry.crop import BORDERS, crop_face, padding_fraction
from vrn.image_io import IMAGE_EXTS, ImageReadError, encode_image_rgb, list_image_files, read_image_rgb

__all__ = ["CropStage", "check_not_eval_set"]

#: folder names of evaluation-only benchmarks (``refuse_eval_sets``): AFLW2000-3D,
#: e.g. ``aflw2000_3d``, ``AFLW2000``, ``AFLW2000-3D``, ``aflw2000_3d_sample``
EVAL_SET_DIR = re.compile(r"^aflw[-_]?2000([-_]?3d)?([-_]sample)?$", re.IGNORECASE)


def _r(a: np.ndarray, nd: int = 4) -> list:
    return np.round(np.asarray(a, dtype=np.float64), nd).tolist()


def check_not_eval_set(input_dir: Path, rels: list[str]) -> None:
    """Refuse AFLW2000-3D as training input (it is for evaluation only).

    Args:
        input_dir: the photos folder.
        rels: its image files, relative to ``input_dir``.
    Raises:
        PipelineInputError: ``input_dir`` (resolved), a folder above it or a sub-folder
            holding images is named like AFLW2000-3D (:data:`EVAL_SET_DIR`), or an image has
            a ``.mat`` beside it holding ``pt3d_68``.
    """
    root = Path(input_dir).resolve()
    dirs = {root, *root.parents, *((root / r).parent for r in rels)}
    for d in sorted(dirs):
        if EVAL_SET_DIR.match(d.name):
            raise PipelineInputError(
                f"input_dir={input_dir} is the AFLW2000-3D benchmark ({d}): it is for evaluation only, never "
                f"for training, validation or model selection (crop.refuse_eval_sets=true)."
            )
    for r in rels:
        mat = (root / r).with_suffix(".mat")
        if mat.is_file():
            try:
                names = {n for n, _, _ in sio.whosmat(str(mat))}
            except (OSError, ValueError, sio.matlab.MatReadError):  # an unreadable .mat is not AFLW2000-3D's
                names = set()
            if "pt3d_68" in names:
                raise PipelineInputError(
                    f"{mat} holds pt3d_68: {r} is an AFLW2000-3D image, which is for evaluation only, never for "
                    f"training, validation or model selection (crop.refuse_eval_sets=true). Remove the "
                    f"AFLW2000-3D images from input_dir={input_dir}."
                )


class CropStage(Stage):
    """The crop stage (see the module doc).

    Args:
        detector: a :class:`~vrn.detectors.base.FaceDetector`.
        crop_size, face_size: the VRN crop rule.
        border_value: padding grey level (``border="constant"``).
        border: margin fill outside the photo, one of :data:`vrn.geometry.crop.BORDERS`.
        refuse_eval_sets: refuse AFLW2000-3D inputs (:func:`check_not_eval_set`).
        source_roi_px: 0, or N: the photos are N x N px 3DDFA face crops (module doc).
        image_exts: file extensions read from ``input_dir``.
        recursive: look into sub-folders (300W-LP keeps its images in per-set folders).
    """

    name = "crop"
    needs_manifest = False

    def __init__(
        self,
        detector: FaceDetector,
        crop_size: int = CROP_SIZE,
        face_size: float = CROP_FACE_SIZE,
        border_value: int = 0,
        image_exts: list[str] | tuple[str, ...] = IMAGE_EXTS,
        recursive: bool = True,
        border: str = "constant",
        refuse_eval_sets: bool = False,
        source_roi_px: int = 0,
    ) -> None:
        self.detector = detector
        self.crop_size = int(crop_size)
        self.face_size = float(face_size)
        self.border_value = int(border_value)
        if border not in BORDERS:
            raise ValueError(f"crop.border must be one of {', '.join(BORDERS)}, got {border!r}")
        self.border = str(border)
        self.refuse_eval_sets = bool(refuse_eval_sets)
        self.source_roi_px = int(source_roi_px)
        if self.source_roi_px < 0:
            raise ValueError(f"crop.source_roi_px must be 0 or the input photos' side in px, got {source_roi_px}")
        self.image_exts = tuple(str(e).lower() for e in image_exts)
        self.recursive = bool(recursive)

    def params(self) -> dict[str, Any]:
        p = {
            "detector": self.detector.describe(),
            "crop_size": self.crop_size,
            "face_size": self.face_size,
            "border_value": self.border_value,
            "image_exts": list(self.image_exts),
            "recursive": self.recursive,
        }
        # the new keys only when not at their defaults: folders made before they existed keep
        # their stage.json (a rerun is not refused) and their bytes
        if self.border != "constant":
            p["border"] = self.border
        if self.refuse_eval_sets:
            p["refuse_eval_sets"] = True
        if self.source_roi_px:
            p["source_roi_px"] = self.source_roi_px
        return p

    def setup(self) -> None:
        self.detector.setup()

    def list_items(self, input_dir: Path, upstream: dict[str, Any] | None, out_dir: Path) -> list[Item]:
        rels = list_image_files(input_dir, self.image_exts, self.recursive)
        if not rels:
            raise PipelineInputError(f"input_dir={input_dir} holds no images ({', '.join(self.image_exts)}).")
        if self.refuse_eval_sets:
            check_not_eval_set(input_dir, rels)
        return [
            Item(safe_id(r), {"source_image": r, "path": os.path.relpath(input_dir / r, out_dir).replace(os.sep, "/")})
            for r in rels
        ]

    def process(self, item: Item, ctx: ItemContext) -> list[dict[str, Any]]:
        path = ctx.path(item.data["path"])
        try:
            image = read_image_rgb(path)
        except ImageReadError as e:
            raise ItemFailure("unreadable_image", str(e)) from e
        n = self.source_roi_px
        if n and image.shape[:2] != (n, n):
            raise ItemFailure(
                "not_source_roi_size",
                f"{image.shape[1]}x{image.shape[0]} px, but crop.source_roi_px={n} says the photos are "
                f"{n}x{n} face crops",
            )
        dets = self.detector.detect(image, str(path))
        if not dets:
            raise ItemFailure("no_face", f"no face found by detector '{self.detector.name}'")
        H, W = image.shape[:2]
        samples = []
        for k, d in enumerate(dets):
            sid = f"{item.id}_f{k}"
            crop, t = crop_face(image, d.landmarks, self.crop_size, self.face_size, self.border_value, self.border)
            pad = padding_fraction(t, (H, W))
            lm_crop = t.apply(d.landmarks)
            record = {
                "id": sid,
                "source_image": item.data["source_image"],
                "image_size": [H, W],
                "face_index": k,
                "detector": self.detector.name,
                "score": round(d.score, 6),
                "box": _r(d.box),
                "landmarks_image": _r(d.landmarks),
                "landmarks_crop": _r(lm_crop),
                "transform": t.to_dict(),
                "pad_fraction": round(pad, 6),
            }
            if self.border != "constant":  # default records stay byte-identical to older runs
                record["border"] = self.border
            files = {
                "crop": ctx.write_bytes(f"items/{sid}.png", encode_image_rgb(crop, ".png")),
                "crop_record": ctx.write_json(f"items/{sid}.json", record),
                "source_image": item.data["path"],
            }
            samples.append(
                {
                    "id": sid,
                    "item": item.id,
                    "source_image": item.data["source_image"],
                    "face_index": k,
                    "detector": self.detector.name,
                    "score": record["score"],
                    "pad_fraction": record["pad_fraction"],
                    "transform": record["transform"],
                    "files": files,
                }
            )
        return samples


@hydra.main(version_base="1.3", config_path="../conf/pipeline", config_name="crop")
def main(cfg: DictConfig) -> None:
    run_single_stage(cfg, "crop")


if __name__ == "__main__":
    main()
