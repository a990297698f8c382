"""README figure: the same photos reconstructed by two checkpoints, side by side.

    python scripts/make_before_after_figure.py --before <synthetic-only ckpt> --after <real-faces ckpt> \
        --out docs/figures/before_after.png

One row per face (the largest face of each photo): the photo's face window | overlay and a
turntable frame (60 degrees) for ``--before`` | the same for ``--after``. Faces are found by the
offline detector (``tddfa``) so the script runs without downloads.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from vrn.image_io import read_image_rgb
from vrn.inference import Reconstructor
from vrn.render import render_overlay, render_turntable

DEFAULT_IMAGES = ("emma.jpg", "trump_hillary.jpg", "JianzhuGuo.jpg", "AFLW_image00046.jpg", "AFLW_image00190.jpg")


def _face_window(image: np.ndarray, verts: np.ndarray, tile: int) -> tuple[int, int, int, int]:
    """A square window (x0, y0, x1, y1) image px around a face mesh, clipped to the photo."""
    lo, hi = verts[:, :2].min(0), verts[:, :2].max(0)
    c, half = (lo + hi) / 2, 0.65 * float((hi - lo).max())
    x0, y0 = (np.maximum(c - half, 0)).astype(int)
    x1, y1 = (np.minimum(c + half, [image.shape[1], image.shape[0]])).astype(int)
    return int(x0), int(y0), int(x1), int(y1)


def _tile(img: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(np.ascontiguousarray(img), (size, size), interpolation=cv2.INTER_AREA)


def row_for(image: np.ndarray, recs: list[Reconstructor], size: int) -> np.ndarray | None:
    """Photo window, then (overlay, turntable frame) per checkpoint; None when no face."""
    faces = [rec(image) for rec in recs]
    if not faces[0] or not faces[0][0].has_surface:
        return None
    k = int(np.argmax([np.ptp(f.verts[:, 0]) if f.has_surface else 0 for f in faces[0]]))
    x0, y0, x1, y1 = _face_window(image, faces[0][k].verts, size)
    cells = [_tile(image[y0:y1, x0:x1], size)]
    for fs in faces:
        f = fs[k] if k < len(fs) else None
        if f is None or not f.has_surface:
            cells += [np.zeros((size, size, 3), np.uint8)] * 2
            continue
        ov = render_overlay(image, [(f.verts, f.faces)])
        frames = render_turntable(f.verts, f.faces, f.colors, frames=6, size=size, sweep_deg=360)
        cells += [_tile(ov[y0:y1, x0:x1], size), frames[1]]
    return np.concatenate(cells, axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="checkpoint shown in columns 2-3")
    ap.add_argument("--after", required=True, help="checkpoint shown in columns 4-5 ('pretrained' for the shipped one)")
    ap.add_argument("--images", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "images"))
    ap.add_argument("--names", nargs="*", default=list(DEFAULT_IMAGES))
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--out", default="docs/figures/before_after.png")
    a = ap.parse_args()
    os.environ.setdefault("VRN_ASSETS_DIR", str(Path(a.images).parents[1] / "assets"))
    recs = [
        Reconstructor.from_pretrained(detector="tddfa")
        if c == "pretrained"
        else Reconstructor.from_checkpoint(c, detector="tddfa")
        for c in (a.before, a.after)
    ]
    rows = [r for n in a.names if (r := row_for(read_image_rgb(Path(a.images) / n), recs, a.size)) is not None]
    if not rows:
        raise SystemExit("no face found in the given images")
    fig = np.concatenate(rows, axis=0)
    # a 256-colour palette keeps the committed PNG small (a docs figure, not data)
    Image.fromarray(fig).quantize(256, method=Image.Quantize.MEDIANCUT).save(a.out, optimize=True)
    print(f"wrote {a.out}: {len(rows)} rows (photo | before: overlay, 60 deg | after: overlay, 60 deg)")


if __name__ == "__main__":
    main()
