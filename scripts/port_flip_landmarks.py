#!/usr/bin/env python
"""The 3DDFA_V2 port's 68 landmarks on AFLW2000-3D with and without flip averaging.

    VRN_ASSETS_DIR=../shared/assets python scripts/port_flip_landmarks.py [--root DIR] [--limit N]

3DDFA's protocol (the crop from each face's ``benchmark.npz`` ``roi_box``): the port once
(``vrn.detectors.tddfa.port_landmarks(..., roi=True, flip=False)``, the evaluation's reference
line) and averaged with its pass on the mirrored image (``flip=True``). Prints, by |yaw| bucket
and as the mean of the three buckets: the 2D NME against ``pts68`` (/ sqrt(w h) of the GT box,
as :func:`vrn.aflw_benchmark.nme_2d_3ddfa`), and the paired difference with its standard error.
Only the 2D landmarks of the port are compared: nothing here trains or selects a VRN model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from vrn.aflw_benchmark import load_benchmark, nme_2d_3ddfa
from vrn.detectors.tddfa import port_landmarks
from vrn.face_models.tddfa_models import load_tddfa
from vrn.image_io import read_image_rgb
from vrn.nme import bucket_names, yaw_bucket


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(here.parent / "shared" / "data" / "aflw2000_3d"))
    ap.add_argument("--limit", type=int, default=0, help="first N faces only (0: all)")
    args = ap.parse_args()
    arr = load_benchmark(args.root)
    port = load_tddfa()
    names = list(arr.names)[: args.limit or None]
    rows = []
    for i, name in enumerate(names):
        img = read_image_rgb(Path(args.root) / f"{name}.jpg")
        box = np.asarray(arr.roi_box[i], np.float64)[None]
        one, both = (port_landmarks(port, img, box, refine=False, flip=f, roi=True)[0] for f in (False, True))
        gt = arr.pts68[i]
        rows.append((yaw_bucket(arr.yaw_abs_deg[i]), nme_2d_3ddfa(one.T, gt), nme_2d_3ddfa(both.T, gt)))
    print(f"AFLW2000-3D, {len(rows)} faces, 3DDFA's roi_box crops, 68-point 2D NME vs pts68 (%)\n")
    print("| | " + " | ".join(bucket_names()) + " | mean of buckets |\n|---|" + "---:|" * 4)
    means = {}
    for col, label in ((1, "port, one pass"), (2, "port, flip averaged")):
        m = [100 * np.mean([r[col] for r in rows if r[0] == b]) for b in bucket_names()]
        means[col] = m
        print(f"| {label} | " + " | ".join(f"{x:.2f}" for x in m) + f" | {np.mean(m):.2f} |")
    diffs = []
    for b in bucket_names():
        d = 100 * np.array([r[2] - r[1] for r in rows if r[0] == b])
        diffs.append(f"{d.mean():+.3f} +- {d.std() / np.sqrt(max(len(d), 1)):.3f} (n={len(d)})")
    print("| flip - one pass (paired) | " + " | ".join(diffs) + " | |")


if __name__ == "__main__":
    main()
