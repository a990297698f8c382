"""Compare the fit stage's dense targets against AFLW2000-3D's 3D landmarks (evaluation only).

For each face (sorted ``image*.jpg`` of ``--data``, the first ``--limit``):

1. ground truth: the ``.mat``'s ``pt3d_68`` (3, 68), MATLAB 1-based image px -> 0-based
   (x - 1, y - 1; z as stored, toward the camera, image px units);
2. the VRN crop from those landmarks (:func:`vrn.geometry.crop.crop_face`); ground truth
   mapped into crop px (:meth:`CropTransform.apply`, z scaled by the crop scale);
3. the 3DDFA_V2 port on the crop, ROI from the crop's landmarks, exactly as the fit stage
   (:class:`data_pipeline.fit.TDDFAFitter`), giving the stand-in target ("mean face +
   landmark spline", ``fitter=tddfa``) and the port's 68 3D landmarks;
4. SFM targets fitted to the port's landmarks (:func:`fit_sfm_to_landmarks`) for each
   ``--lambdas`` value (``lambda_shape = lambda_expression``), and the posed mean SFM face
   (coefficients zero, ``lambda = inf``);
5. metrics, normalised by the ground truth's 3D outer interocular distance (iBUG 37-46):
   * ``surf_z``: mean distance from each ground-truth landmark to the target surface after
     the best z shift (x, y are registered by construction; z has no common origin);
   * ``surf_rigid``: the same after a rigid ICP of the 68 ground-truth points onto the
     surface (:func:`vrn.nme.icp`, started from the z shift);
   * ``lmk``: the target's own landmark points (stand-in: its 68 landmark vertices = the
     port's landmarks; SFM: the fitted landmarks, 66 defined) vs ground truth after the
     mean z shift (:func:`vrn.nme.landmark_nme`).
   The surface is the mesh sampled on its triangles (barycentric grid, spacing < 0.5 crop
   px), so a coarse mesh is not penalised for its vertex spacing.

AFLW2000-3D is a benchmark: this script evaluates, it never trains or selects a model
(the lambda chosen here is a fitting hyper-parameter of the pipeline; see docs/pipeline.md).

``python scripts/compare_fit_targets.py --limit 100`` (``--flip``: also ``fitter.flip=true``'s
stand-in, the crop's fit averaged with the mirrored crop's, and the SFM fitted to the averaged
landmarks for each ``--lambdas`` value, ``fitter=sfm flip=true``)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from data_pipeline.fit import TDDFAFitter
from vrn.face_models.mat_fit import load_mat_fit, mat_path_for
from vrn.face_models.sfm import load_sfm
from vrn.face_models.sfm_fit import fit_sfm_to_landmarks
from vrn.geometry.crop import crop_face
from vrn.image_io import read_image_rgb
from vrn.nme import icp, interocular_distance, landmark_nme

BUCKETS = (("[0,30]", 0.0, 30.0), ("(30,60]", 30.0, 60.0), ("(60,90]", 60.0, math.inf))


def bucket(yaw_abs: float) -> str:
    for name, lo, hi in BUCKETS:
        if (lo == 0.0 and yaw_abs <= hi) or lo < yaw_abs <= hi:
            return name
    return BUCKETS[-1][0]


def surface_points(verts: np.ndarray, tris: np.ndarray, spacing: float = 0.5) -> np.ndarray:
    """(N, 3) points on the triangles: a barycentric grid of n steps per edge, n such that
    the mean edge length / n < spacing (vertices included)."""
    v = np.asarray(verts, np.float64)
    t = np.asarray(tris, np.int64)
    edge = np.linalg.norm(v[t[:, 0]] - v[t[:, 1]], axis=1).mean()
    n = max(1, math.ceil(edge / spacing))
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    keep = (i + j) <= n
    a, b = i[keep] / n, j[keep] / n
    w = np.stack([1 - a - b, a, b], 1)  # (G, 3)
    pts = np.einsum("gk,fkc->fgc", w, v[t]).reshape(-1, 3)
    return np.unique(np.round(pts, 4), axis=0)


def z_shift_distances(
    gt: np.ndarray, tree: cKDTree, surf: np.ndarray, iterations: int = 30
) -> tuple[np.ndarray, float]:
    """Nearest-surface distances of ``gt`` (K, 3) after the z shift that minimises them
    (ICP restricted to a z translation, started from the shift that matches the front-most
    points: the nose tip)."""
    dz = float(surf[:, 2].max() - gt[:, 2].max())
    for _ in range(iterations):
        d, idx = tree.query(gt + [0.0, 0.0, dz])
        new = float(np.mean(surf[idx, 2] - gt[:, 2]))
        if abs(new - dz) < 1e-4:
            break
        dz = new
    d, _ = tree.query(gt + [0.0, 0.0, dz])
    return d, dz


def evaluate_target(gt: np.ndarray, verts: np.ndarray, tris: np.ndarray, lms: np.ndarray, iod: float) -> dict:
    surf = surface_points(verts, tris)
    tree = cKDTree(surf)
    d_z, dz = z_shift_distances(gt, tree, surf)
    res = icp(gt, surf, init_t=np.array([0.0, 0.0, dz]), tree=tree)
    return {
        "surf_z": float(d_z.mean() / iod),
        "surf_rigid": float(res.distances.mean() / iod),
        "surf_z_51": float(d_z[17:].mean() / iod),
        "lmk": landmark_nme(lms, gt, iod),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "aflw2000_3d"))
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--lambdas", default="1,3,10,30,100,300", help="comma-separated lambda_shape = lambda_expression")
    p.add_argument("--json", default=None, help="write per-face rows here")
    p.add_argument("--flip", action="store_true", help="also fitter.flip=true's stand-in and SFM fits (crop + mirror)")
    a = p.parse_args(argv)

    images = sorted(Path(a.data).glob("image*.jpg"))[: a.limit]
    lambdas = [float(x) for x in a.lambdas.split(",") if x]
    fitter = TDDFAFitter(smooth_standin=True)
    fitter.setup()
    sfm = load_sfm()
    flip_fitter = TDDFAFitter(smooth_standin=True, flip=True) if a.flip else None
    sfm_methods = [f"sfm_l{lam:g}" for lam in lambdas] + ["sfm_mean"]
    sfm_flip_methods = [f"sfm_l{lam:g}_flip" for lam in lambdas] if a.flip else []
    methods = ["standin"] + (["standin_flip"] if a.flip else []) + sfm_methods + sfm_flip_methods
    rows = []
    t0 = time.perf_counter()
    for path in images:
        mat = load_mat_fit(mat_path_for(path))
        gt_img = np.asarray(mat["pt3d_68"], np.float64).T.copy()  # (68, 3)
        gt_img[:, :2] -= 1.0
        yaw = abs(math.degrees(float(np.asarray(mat["Pose_Para"]).ravel()[1])))
        crop, T = crop_face(read_image_rgb(path), gt_img[:, :2])
        gt = T.apply(gt_img)
        iod = interocular_distance(gt)
        port = fitter.fit(crop, T.apply(gt_img[:, :2]), {}, None)
        row = {"image": path.name, "yaw": yaw, "bucket": bucket(yaw)}
        row["standin"] = evaluate_target(gt, port.verts, port.tris, port.landmarks, iod)
        if flip_fitter is not None:
            fl = flip_fitter.fit(crop, T.apply(gt_img[:, :2]), {}, None)
            row["standin_flip"] = evaluate_target(gt, fl.verts, fl.tris, fl.landmarks, iod)
        fits = [(port.landmarks, zip(lambdas + [math.inf], sfm_methods, strict=True))]
        if flip_fitter is not None:  # fitter=sfm flip=true: the SFM on the port's mirror-averaged landmarks
            fits.append((fl.landmarks, zip(lambdas, sfm_flip_methods, strict=True)))
        for landmarks, named in fits:
            for lam, name in named:
                f = fit_sfm_to_landmarks(landmarks, sfm, lambda_shape=lam, lambda_expression=lam)
                row[name] = {**evaluate_target(gt, f.verts, f.tris, f.landmarks, iod), "residual": f.residual}
        rows.append(row)
    wall = time.perf_counter() - t0

    metrics = [
        ("surf_z", "GT 3D landmarks -> target surface, z shift only"),
        ("surf_rigid", "GT 3D landmarks -> target surface, rigid ICP"),
        ("surf_z_51", "as the first, 51 inner landmarks (no jaw contour)"),
        ("lmk", "target's own landmark points vs GT (z shift); SFM: 66 defined, stand-in: 68"),
    ]
    counts = {b: sum(r["bucket"] == b for r in rows) for b, _, _ in BUCKETS}
    n_by_bucket = ", ".join(f"{b}: {n}" for b, n in counts.items())
    head = (
        f"AFLW2000-3D, first {len(rows)} faces of {a.data} ({n_by_bucket}); "
        f"NME in % of the 3D outer interocular distance; {wall:.0f} s wall"
    )
    out = [head, ""]
    for key, title in metrics:
        out += [
            f"**{key}**: {title}",
            "",
            "| target | " + " | ".join(f"{b} mean" for b, _, _ in BUCKETS) + " | all mean | all median | "
            "balanced |" + (" SFM residual (crop px) |" if key == "lmk" else ""),
            "|---|" + "---:|" * (len(BUCKETS) + 3) + ("---:|" if key == "lmk" else ""),
        ]
        for mth in methods:
            vals = np.array([r[mth][key] for r in rows])
            per = [np.nanmean(vals[[r["bucket"] == b for r in rows]]) if counts[b] else np.nan for b, _, _ in BUCKETS]
            cells = [f"{100 * v:.2f}" if np.isfinite(v) else "-" for v in per]
            cells += [
                f"{100 * np.nanmean(vals):.2f}",
                f"{100 * np.nanmedian(vals):.2f}",
                f"{100 * np.nanmean(per):.2f}",
            ]
            if key == "lmk":
                cells.append(f"{np.mean([r[mth]['residual'] for r in rows]):.2f}" if mth.startswith("sfm") else "-")
            out.append(f"| {mth} | " + " | ".join(cells) + " |")
        out.append("")
    print("\n".join(out))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
