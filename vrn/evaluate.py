"""Evaluation: ``python -m vrn.evaluate ckpt=CKPT data=aflw2000_3d data.root=DIR`` (conf/evaluate.yaml).

Metrics per sample (the math is in :mod:`vrn.nme`):

* ``nme_icp``: VRN paper's surface NME: ICP establishes correspondences, distances are taken
  without the rigid alignment (up to the z shift: depth has no common origin), normalised
  by the 3D outer interocular distance (landmarks 37 and 46);
* ``nme_rigid``: the same with the full rigid alignment;
* ``nme_lmk_2d`` / ``nme_lmk_3d``: 68-landmark NME normalised by ``sqrt(w * h)`` of the
  ground-truth landmark box (3DDFA / PRNet); landmark z read from the predicted (front)
  surface; ``nme_lmk_3d_51`` the same without the 17 jaw-contour landmarks (3DMM contour
  vertices that the cheek often hides, so a front-surface depth is wrong for them even
  with a perfect volume);
* ``iou``: voxel IoU of ``p > threshold`` with the ground-truth volume (:func:`vrn.metrics.voxel_iou`).

Datasets (``data=`` selects ``conf/eval_data/<name>.yaml``; Hydra's own spelling of the
override is ``eval_data@data=<name>``, which ``python -m vrn.evaluate`` also accepts):

* ``synthetic`` (default): the synthetic test split (the training cache when it exists,
  else only the test split is rendered; sample ``i`` is the same either way). Ground truth:
  the packed target volume; its camera-facing surface for the surface NME; landmarks and
  yaw from the manifest rows.
* ``folder``: any packed folder (``data.root``, ``data.split``), same ground truth.
* ``aflw2000_3d``: a folder of AFLW2000-3D ``.jpg`` + ``.mat``. Ground-truth landmarks
  ``pt3d_68``; yaw from ``Pose_Para``; with ``data.bfm_path`` (face3d's ``BFM.mat`` or
  3DDFA_V2's ``bfm_noneck_v3.pkl``) the dense ground-truth mesh of the ``.mat`` fit
  (38,365-vertex no-neck region) for the surface NME and IoU; without it, landmark NME only.

Outputs in the run folder (``output_dir``): ``results.md`` (Markdown table by yaw bucket),
``results.json`` (summary, settings, per-sample rows).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from vrn.conventions import DEPTH_FACTOR
from vrn.detectors import get_detector
from vrn.face_models.bfm import dense_model_shape, load_dense_bfm, rotation_to_crop_frame
from vrn.face_models.mat_fit import angles_to_matrix_3ddfa, load_mat_fit, mat_fit_points
from vrn.geometry.crop import crop_face
from vrn.image_io import read_image_rgb
from vrn.volume.surface import front_depth_of_code, front_surface_points
from vrn.volume.voxelize import solid_depth_shift, voxelize_face
from vrn.geometry.transforms import CropTransform
from vrn.inference import Reconstructor, volume_to_image_mesh
from vrn.nme import (
    interocular_distance,
    landmark_box_size,
    landmark_nme,
    markdown_table,
    summarize,
    surface_depth_at,
    surface_nme,
    yaw_bucket,
    yaw_from_rotation,
)
from vrn.volume.codec import VolumeCode, decode

log = logging.getLogger(__name__)

__all__ = ["EvalSample", "PackedEvalDataset", "AFLW2000Dataset", "build_dataset", "score_sample", "evaluate",
           "METRICS", "translate_overrides"]

#: (key, table header, scale, decimals)
METRICS: list[tuple[str, str, float, int]] = [
    ("nme_icp", "surface NME, ICP corr. (%)", 100.0, 2),
    ("nme_rigid", "surface NME, rigid (%)", 100.0, 2),
    ("nme_lmk_2d", "68-lmk NME 2D (%)", 100.0, 2),
    ("nme_lmk_3d", "68-lmk NME 3D (%)", 100.0, 2),
    ("nme_lmk_3d_51", "51-lmk NME 3D, no jaw (%)", 100.0, 2),
    ("iou", "voxel IoU", 1.0, 3),
]


@dataclass
class EvalSample:
    """One evaluation sample, everything in image px unless said otherwise.

    Attributes:
        id: sample name.
        crop: (192, 192, 3) uint8 RGB network input.
        transform: image px -> crop px (identity for packed crops).
        yaw: degrees (bucket by |yaw|).
        gt_code: ground-truth occupancy (crop px) for the IoU, or None.
        gt_verts: (N, 3) ground-truth surface points for the surface NME, or None.
        gt_landmarks: (68, 3) ground-truth landmarks (NaN rows = absent), or None.
        pred_landmarks_xy: (68, 2) x, y of the predicted landmarks, or None.
        landmarks_xy_from: "detector" or "ground truth" (then the 2D NME is not reported).
        info: provenance (crop source, GT mesh source, ...).
        error: set when the sample could not be prepared (then it is counted and skipped).
    """

    id: str
    crop: np.ndarray | None
    transform: CropTransform | None
    yaw: float
    gt_code: VolumeCode | None = None
    gt_verts: np.ndarray | None = None
    gt_landmarks: np.ndarray | None = None
    pred_landmarks_xy: np.ndarray | None = None
    landmarks_xy_from: str = "ground truth"
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


_IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


# --------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------


class PackedEvalDataset(Dataset):
    """Samples of a packed folder (crop px = image px).

    Args:
        root: packed folder.
        split: manifest split ("test"); None = all rows.
        max_samples: keep the first N.
        depth_factor: depth bins per crop px.
    """

    def __init__(self, root: str | os.PathLike, split: str | None = "test", max_samples: int | None = None,
                 depth_factor: float = DEPTH_FACTOR) -> None:
        from vrn.data.packed import PackedReader

        self.reader = PackedReader(root, split=split)
        if len(self.reader) == 0:
            raise ValueError(f"{root} has no samples in split '{split}'")
        self.n = len(self.reader) if max_samples is None else min(len(self.reader), int(max_samples))
        self.depth_factor = float(depth_factor)
        self.root = str(root)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> EvalSample:
        s = self.reader[i]
        row = s.row
        lm = None
        for key in ("landmarks", "landmarks_3d", "landmarks_crop"):
            if row.get(key) is not None:
                a = np.asarray(row[key], np.float64)
                if a.shape[0] == 68:
                    lm = a if a.shape[1] == 3 else None
                    break
        if "yaw" in row:
            yaw = float(row["yaw"])
        elif "rotation" in row:
            yaw = yaw_from_rotation(np.asarray(row["rotation"], np.float64))
        else:
            yaw = float("nan")
        return EvalSample(
            id=str(row.get("id", i)), crop=s.image, transform=CropTransform(_IDENTITY, s.image.shape[:2]), yaw=yaw,
            gt_code=s.code, gt_verts=front_surface_points(front_depth_of_code(s.code), self.depth_factor), gt_landmarks=lm,
            pred_landmarks_xy=None if lm is None else lm[:, :2].copy(), landmarks_xy_from="ground truth",
            info={"source": str(row.get("source", "packed")), "gt_surface": "front surface of the GT volume"})


class AFLW2000Dataset(Dataset):
    """AFLW2000-3D: ``<name>.jpg`` + ``<name>.mat`` pairs in a folder.

    Args:
        root: the folder.
        bfm_path: None (landmark NME only), "standin" (the offline stand-in: mean face +
            landmark spline; for testing the code path, NOT a benchmark), or the path of
            face3d's ``BFM.mat`` / 3DDFA_V2's ``bfm_noneck_v3.pkl`` (dense GT mesh).
        crop: "detector" (crop and landmark x, y from ``detector``; falls back to the
            ground-truth crop when no face is found) or "gt" (crop from ``pt3d_68``).
        detector: a ``FaceDetector`` (needed for crop="detector").
        max_samples: keep the first N images (sorted by name).
        depth_bins, depth_factor: volume layout for the ground-truth volume.
    """

    def __init__(self, root: str | os.PathLike, bfm_path: str | None = None, crop: str = "detector",
                 detector: Any = None, max_samples: int | None = None, depth_bins: int = 200,
                 depth_factor: float = DEPTH_FACTOR) -> None:
        self.root = Path(os.path.expanduser(str(root)))
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root={self.root} is not a folder: point it at your AFLW2000-3D folder "
                                    f"(image*.jpg + image*.mat)")
        self.images = sorted(p for p in self.root.glob("*.jpg") if p.with_suffix(".mat").is_file())
        if not self.images:
            raise FileNotFoundError(f"data.root={self.root} holds no .jpg + .mat pairs (AFLW2000-3D layout)")
        if max_samples is not None:
            self.images = self.images[: int(max_samples)]
        if crop not in ("detector", "gt"):
            raise ValueError(f"data.crop must be 'detector' or 'gt', got {crop!r}")
        if crop == "detector" and detector is None:
            raise ValueError("data.crop=detector needs a detector")
        self.crop = crop
        self.detector = detector
        self.bfm_path = None if bfm_path in (None, "", "null", "none") else str(bfm_path)
        self.depth_bins = int(depth_bins)
        self.depth_factor = float(depth_factor)
        self._bfm = None

    def __len__(self) -> int:
        return len(self.images)

    def _load_bfm(self) -> Any:
        if self._bfm is None:
            self._bfm = (load_dense_bfm(None, "offline_standin") if self.bfm_path == "standin"
                         else load_dense_bfm(self.bfm_path))
        return self._bfm

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_bfm": None}

    def __getitem__(self, i: int) -> EvalSample:
        path = self.images[i]
        sid = path.stem
        try:
            image = read_image_rgb(path)
            mat = load_mat_fit(path.with_suffix(".mat"))
        except Exception as e:  # noqa: BLE001 - unreadable image or .mat: recorded as a failed sample
            return EvalSample(sid, None, None, float("nan"), error=f"{type(e).__name__}: {e}")
        H = image.shape[0]
        pose = np.asarray(mat["Pose_Para"], np.float64).ravel()
        yaw = float(np.degrees(pose[1]))
        if "pt3d_68" not in mat:
            return EvalSample(sid, None, None, yaw, error="no pt3d_68 in the .mat")
        p3 = np.asarray(mat["pt3d_68"], np.float64)
        gt_lm = np.stack([p3[0] - 1.0, p3[1] - 1.0, p3[2]], 1)  # MATLAB 1-based -> 0-based pixel centres
        info: dict[str, Any] = {"image": path.name}
        xy = None
        xy_from = "ground truth"
        if self.crop == "detector":
            dets = self.detector.detect(image, str(path))
            if dets:
                # the detection nearest the annotated face (AFLW2000-3D annotates one face)
                c_gt = (gt_lm[:, :2].min(0) + gt_lm[:, :2].max(0)) / 2
                d = min(dets, key=lambda d: float(np.linalg.norm((d.box[:2] + d.box[2:]) / 2 - c_gt)))
                xy, xy_from = np.asarray(d.landmarks, np.float64), "detector"
                info["crop"] = "detector"
            else:
                info["crop"] = "gt (no face detected)"
        else:
            info["crop"] = "gt"
        crop, T = crop_face(image, xy if xy is not None else gt_lm[:, :2])
        s = EvalSample(sid, crop, T, yaw, gt_landmarks=gt_lm, pred_landmarks_xy=xy if xy is not None else gt_lm[:, :2],
                       landmarks_xy_from=xy_from, info=info)
        if self.bfm_path is not None:
            bfm = self._load_bfm()
            dense, _lms, how = dense_model_shape(bfm, mat["Shape_Para"], mat["Exp_Para"])
            verts = mat_fit_points(dense, pose, H)  # (V, 3) image px, z toward the camera
            s.gt_verts = verts
            R = rotation_to_crop_frame(angles_to_matrix_3ddfa(pose[0], pose[1], pose[2]))
            vc = T.apply(verts)
            # the project's convention (as the pipeline's fit stage): the target solid centred in depth
            vc[:, 2] += solid_depth_shift(vc, np.asarray(bfm.tri, np.int32), R, depth_bins=self.depth_bins,
                                          depth_factor=self.depth_factor)
            s.gt_code = voxelize_face(vc.astype(np.float32), np.asarray(bfm.tri, np.int32), R,
                                      depth_bins=self.depth_bins, depth_factor=self.depth_factor)
            s.info["gt_mesh"] = f"{bfm.source} ({how})"
        return s


def _synthetic_root(d: DictConfig) -> Path:
    """The synthetic test split: the training cache when present, else a test-only cache."""
    from vrn.data.synthetic import SyntheticFaceConfig, cache_name, generate_packed

    gen_kw = OmegaConf.to_container(d.generator, resolve=True) if d.get("generator") else {}
    gen = SyntheticFaceConfig(**gen_kw)  # type: ignore[arg-type]
    cache = Path(os.path.expanduser(str(d.cache_dir)))
    full = {"train": int(d.num_train), "val": int(d.num_val), "test": int(d.num_test)}
    root = cache / cache_name(gen, full, int(d.gen_seed))
    if (root / "meta.json").is_file():
        return root
    only = {"train": 0, "val": 0, "test": int(d.num_test)}
    root = cache / cache_name(gen, only, int(d.gen_seed))
    if not (root / "meta.json").is_file():
        log.info(f"Rendering the synthetic test split ({only['test']} faces) into {root}")
        generate_packed(root, gen, only, seed=int(d.gen_seed), workers=int(d.get("num_gen_workers", 0)))
    return root


def build_dataset(d: DictConfig, max_samples: int | None = None) -> Dataset:
    """The evaluation dataset of a ``conf/eval_data`` config."""
    kind = str(d.kind)
    if kind == "synthetic":
        return PackedEvalDataset(_synthetic_root(d), split=str(d.get("split", "test")), max_samples=max_samples)
    if kind == "packed":
        if d.get("root") in (None, "???"):
            raise ValueError("data.root must be a packed folder (data=folder data.root=/path/to/packed)")
        split = d.get("split", "test")
        return PackedEvalDataset(d.root, split=None if split in (None, "all") else str(split), max_samples=max_samples)
    if kind == "aflw2000_3d":
        det = None
        if str(d.get("crop", "detector")) == "detector":
            det = get_detector(str(d.detector), device=str(d.get("detector_device", "cpu")))
        return AFLW2000Dataset(d.root, bfm_path=d.get("bfm_path"), crop=str(d.get("crop", "detector")), detector=det,
                               max_samples=max_samples)
    raise ValueError(f"unknown data.kind={kind!r}: expected synthetic, packed or aflw2000_3d")


# --------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------


def _f(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def score_sample(s: EvalSample, prob: np.ndarray, threshold: float = 0.5, depth_factor: float = DEPTH_FACTOR,
                 icp: dict[str, Any] | None = None) -> dict[str, Any]:
    """All metrics of one sample.

    Args:
        s: the sample.
        prob: (D, H, W) float predicted probabilities (crop px).
        threshold: occupancy / iso level.
        icp: :func:`vrn.nme.surface_nme` settings (max_iterations, tolerance, fit_subsample).
    Returns:
        a JSON-ready row: id, yaw, bucket, the metrics (None when not applicable), n_verts,
        no_surface, info.
    """
    from vrn.metrics import voxel_iou

    row: dict[str, Any] = {"id": s.id, "yaw": _f(s.yaw), "bucket": yaw_bucket(s.yaw), **{m[0]: None for m in METRICS}}
    row["landmarks_xy_from"] = s.landmarks_xy_from
    row.update({f"info_{k}": v for k, v in s.info.items()})
    assert s.transform is not None
    verts, faces = volume_to_image_mesh(prob, s.transform, threshold, depth_factor)
    row["n_verts"] = int(len(verts))
    row["no_surface"] = len(faces) == 0
    if s.gt_code is not None:
        gt = torch.from_numpy(decode(s.gt_code))[None]
        row["iou"] = float(voxel_iou(torch.from_numpy(np.asarray(prob) > threshold)[None], gt)[0])
    if len(faces) == 0:
        return row
    iod = interocular_distance(s.gt_landmarks) if s.gt_landmarks is not None else float("nan")
    if s.gt_verts is not None and len(s.gt_verts) and math.isfinite(iod) and iod > 0:
        r = surface_nme(verts, s.gt_verts, iod, **(icp or {}))
        row["nme_icp"], row["nme_rigid"] = _f(r.nme_icp), _f(r.nme_rigid)
        row["icp_iterations"] = r.icp.iterations
    if s.gt_landmarks is not None and s.pred_landmarks_xy is not None:
        norm = landmark_box_size(s.gt_landmarks)
        if math.isfinite(norm) and norm > 0:
            xy = np.asarray(s.pred_landmarks_xy, np.float64)
            z = surface_depth_at(verts, faces, xy)
            row["nme_lmk_3d"] = _f(landmark_nme(np.c_[xy, z], s.gt_landmarks, norm))
            # the 17 jaw-contour landmarks of 3DMM fits are model vertices that the cheek often
            # hides: their front-surface depth is wrong even for a perfect volume
            row["nme_lmk_3d_51"] = _f(landmark_nme(np.c_[xy, z][17:], s.gt_landmarks[17:], norm))
            if s.landmarks_xy_from != "ground truth":
                row["nme_lmk_2d"] = _f(landmark_nme(xy, s.gt_landmarks[:, :2], norm))
    return row


def _collate(batch: list[EvalSample]) -> list[EvalSample]:
    return batch


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluation of a composed ``conf/evaluate.yaml``; returns the results dict
    (also written to ``output_dir/results.json`` and ``results.md``)."""
    out_dir = Path(os.path.expanduser(str(cfg.output_dir)))
    out_dir.mkdir(parents=True, exist_ok=True)
    rec = Reconstructor.from_checkpoint(str(cfg.ckpt), device=str(cfg.device), precision=str(cfg.precision),
                                        detector=None, threshold=float(cfg.threshold), batch_size=int(cfg.batch_size))
    ds = build_dataset(cfg.data, cfg.get("max_samples"))
    nw = int(cfg.get("num_workers", 0))
    loader = DataLoader(ds, batch_size=int(cfg.batch_size), shuffle=False, num_workers=nw, collate_fn=_collate)
    icp_cfg = OmegaConf.to_container(cfg.icp, resolve=True) if cfg.get("icp") else {}
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    t0 = time.perf_counter()
    log.info(f"Evaluating {rec!r} on data={cfg.data.name} ({len(ds)} samples)")
    for batch in loader:
        ok = [s for s in batch if s.error is None]
        failures += [{"id": s.id, "error": str(s.error)} for s in batch if s.error is not None]
        if not ok:
            continue
        probs = rec.reconstruct_crops(np.stack([s.crop for s in ok]))
        for s, p in zip(ok, probs):
            row = score_sample(s, p.numpy(), rec.threshold, rec.depth_factor, icp_cfg)  # type: ignore[arg-type]
            rows.append(row)
            log.info(f"{s.id}: yaw {row['yaw'] if row['yaw'] is None else round(row['yaw'], 1)} "
                     + " ".join(f"{k}={row[k]:.4f}" for k, *_ in METRICS if row.get(k) is not None))
    dt = time.perf_counter() - t0
    keys = [m[0] for m in METRICS]
    summary = summarize(rows, keys)
    present = [m for m in METRICS if summary["all"].get(m[0]) is not None]
    n_empty = sum(bool(r["no_surface"]) for r in rows)
    sources: dict[str, int] = {}
    for r in rows:
        sources[r["landmarks_xy_from"]] = sources.get(r["landmarks_xy_from"], 0) + 1
    notes = [
        f"checkpoint: `{cfg.ckpt}` (model {rec.model_spec.get('name')}), threshold {rec.threshold}, "
        f"precision {rec.precision}, device {rec.device}",
        f"data: `{cfg.data.name}` ({len(rows)} samples scored, {len(failures)} failed to load, "
        f"{n_empty} with an empty prediction: their NMEs are missing, IoU counts)",
        "surface NME: mean GT-vertex -> nearest predicted vertex distance / 3D outer interocular distance; "
        "'ICP corr.' = ICP finds the pairs, distances unaligned up to a z shift (VRN paper); "
        "'rigid' = after the rigid alignment",
        "68-lmk NME: / sqrt(w*h) of the GT landmark box; z of each landmark read from the predicted (front) "
        "surface, z offset removed; '51-lmk' leaves out the 17 jaw-contour points, which the cheek often hides "
        "(their front-surface depth is wrong even for a perfect volume); landmark x, y from: "
        + (", ".join(f"{k} ({v})" for k, v in sorted(sources.items())) or "-")
        + " (2D NME only where they come from a detector)",
        "yaw buckets by |yaw|; 'balanced' = mean of the three bucket means (reported only when all three have data)",
    ]
    table = markdown_table(summary, present) if present else "(no metric could be computed)\n"
    md = "# VRN evaluation\n\n" + "\n".join(f"- {n}" for n in notes) + "\n\n" + table
    results = {"summary": summary, "metrics": [m[0] for m in present], "notes": notes, "seconds": dt,
               "ckpt": str(cfg.ckpt), "model": rec.model_spec,
               "data": OmegaConf.to_container(cfg.data, resolve=True), "failures": failures, "samples": rows}
    from vrn.atomic_write import atomic_write

    atomic_write(out_dir / "results.json", json.dumps(results, indent=2).encode())
    atomic_write(out_dir / "results.md", md.encode())
    print(md, flush=True)
    log.info(f"Results: {out_dir / 'results.md'} ({dt:.1f} s)")
    return results


def translate_overrides(argv: list[str]) -> list[str]:
    """``data=NAME`` -> ``eval_data@data=NAME`` (the defaults entry is ``eval_data@data``, so
    Hydra itself only accepts the longer form); other arguments are unchanged."""
    out = []
    for a in argv:
        for prefix in ("data=", "+data=", "++data="):
            if a.startswith(prefix):
                a = "eval_data@data=" + a[len(prefix):]
                break
        out.append(a)
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate.yaml")
def _hydra_main(cfg: DictConfig) -> None:
    evaluate(cfg)


def main() -> None:
    sys.argv = [sys.argv[0]] + translate_overrides(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
