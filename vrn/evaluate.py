"""Evaluation: ``python -m vrn.evaluate ckpt=CKPT data=aflw2000_3d data.root=DIR`` (conf/evaluate.yaml).

Metrics per sample (the math is in :mod:`vrn.nme`):

* ``nme_icp``: VRN paper's surface NME: ICP establishes correspondences, distances are taken
  without the rigid alignment (up to the z shift: depth has no common origin), normalised
  by the 3D outer interocular distance (landmarks 37 and 46);
* ``nme_rigid``: the same with the full rigid alignment;
* ``nme_lmk_surf``: the 68 ground-truth 3D landmarks against the predicted surface after ICP,
  / 3D interocular distance: the AFLW2000-3D benchmark's VRN surface metric
  (:func:`vrn.aflw_benchmark.surface_landmark_nme`) on every dataset with 3D landmarks. On packed
  data it counts the landmarks the face hides (the fit's 3D points), which ``nme_icp`` (against
  the camera-facing GT surface) cannot;
* ``nme_lmk_2d`` / ``nme_lmk_3d``: 68-landmark NME normalised by ``sqrt(w * h)`` of the
  ground-truth landmark box (3DDFA / PRNet); landmark z read from the predicted (front)
  surface; ``nme_lmk_3d_51`` the same without the 17 jaw-contour landmarks (3DMM contour
  vertices that the cheek often hides, so a front-surface depth is wrong for them even
  with a perfect volume);
* ``iou``: voxel IoU of ``p > threshold`` with the ground-truth volume (:func:`vrn.metrics.voxel_iou`).
* ``nme_lmk_3d_fit``: the 68-landmark 3D NME of :mod:`vrn.pose_landmarks`' landmarks (z from the
  surface where visible, from the fitted mean face where hidden);
* ``bench_pose_*`` (where the ground truth has ``Pose_Para``): head pose error in degrees of
  VRN's template fit and of the 3DDFA_V2 port (:func:`vrn.aflw_benchmark.pose_errors`).
* ``confidence_mean``: the face's mean vertex confidence (:mod:`vrn.volume.confidence`, as
  the demo reports it); the report's "Face confidence vs error" section says how well it
  flags the faces with the largest surface NME (:mod:`vrn.confidence_calibration`).

Config: ``conf/eval_data/evaluate.yaml`` (evaluation has its own config folder, so that its
``data`` group is ``conf/eval_data/data/``; ``paths``, ``hydra`` and ``train_data`` there are
links to the training config's ``conf/paths``, ``conf/hydra`` and ``conf/data``).
Datasets (``data=<name>`` selects ``conf/eval_data/data/<name>.yaml``, a ``_target_`` in
:mod:`vrn.eval_datasets`; the crop and the ground-truth volume use the checkpoint's layout):

* ``synthetic`` (default): the synthetic test split of the training config
  ``conf/data/synthetic.yaml`` (same counts and generator settings, so the training cache
  is reused when it exists, else only the test split is rendered; sample ``i`` is the same
  either way). Ground truth: the packed target volume; its camera-facing surface for the
  surface NME; landmarks and yaw from the manifest rows.
* ``folder``: any packed folder (``data.root``, ``data.split``), same ground truth.
* ``aflw2000_3d``: a folder of AFLW2000-3D ``.jpg`` + ``.mat``. Ground-truth landmarks
  ``pt3d_68``; yaw from ``Pose_Para``; with ``data.bfm_path`` (face3d's ``BFM.mat`` or
  3DDFA_V2's ``bfm_noneck_v3.pkl``) the dense ground-truth mesh of the ``.mat`` fit
  (38,365-vertex no-neck region) for the surface NME and IoU; without it, landmark NME only.

Outputs in the run folder (``output_dir``): ``results.md`` (Markdown table by yaw bucket),
``results.json`` (summary, settings, per-sample rows); with ``wandb=true`` also a W&B run
(``wandb_project``, job type "evaluate") with the summary table and per-bucket scalars.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from vrn.aflw_benchmark import (
    BENCHMARK_COLUMNS,
    benchmark_table,
    pose_errors,
    score_benchmark,
    surface_landmark_nme,
)
from vrn.atomic_write import atomic_write
from vrn.cli_errors import check_device, prepare_output_dir, remove_empty, run_cli
from vrn.confidence_calibration import DEFAULT_FRACTION, MIN_FACES, confidence_vs_error
from vrn.conventions import DEFAULT_LAYOUT, VolumeLayout
from vrn.eval_datasets import AFLW2000Dataset, EvalSample, PackedEvalDataset, synthetic_test_set
from vrn.inference import Reconstructor, volume_to_image_mesh
from vrn.metrics import voxel_iou
from vrn.nme import (
    interocular_distance,
    landmark_box_size,
    landmark_nme,
    markdown_table,
    rows_by_yaw_bucket,
    summarize,
    surface_depth_at,
    surface_nme,
    yaw_bucket,
)
from vrn.pose_landmarks import estimate_pose_landmarks
from vrn.volume.codec import decode
from vrn.volume.confidence import vertex_confidence
from vrn.wandb_logging import finish_run, start_run

log = logging.getLogger(__name__)

__all__ = [
    "EvalSample",
    "PackedEvalDataset",
    "AFLW2000Dataset",
    "synthetic_test_set",
    "build_dataset",
    "score_sample",
    "evaluate",
    "METRICS",
]

#: (key, table header, scale, decimals)
METRICS: list[tuple[str, str, float, int]] = [
    ("nme_icp", "surface NME, ICP corr. (%)", 100.0, 2),
    ("nme_rigid", "surface NME, rigid (%)", 100.0, 2),
    ("nme_lmk_surf", "68 lmk to surface, ICP corr. (%)", 100.0, 2),
    ("nme_lmk_2d", "68-lmk NME 2D (%)", 100.0, 2),
    ("nme_lmk_3d", "68-lmk NME 3D (%)", 100.0, 2),
    ("nme_lmk_3d_51", "51-lmk NME 3D, no jaw (%)", 100.0, 2),
    ("nme_lmk_3d_fit", "68-lmk NME 3D, hidden z from the pose fit (%)", 100.0, 2),
    ("iou", "voxel IoU", 1.0, 3),
]


BENCHMARK_NOTES = (
    "- 2D NME: 3DDFA's protocol (the port run on each `roi_box`, / sqrt(w*h) of the GT box, against the arrays "
    "as stored); 3DDFA_V2's published mb1 numbers: 2.63 / 3.42 / 4.48, mean 3.51 (our offline weights: mb05)\n"
    "- surface metrics: ICP pairs each of the 68 GT 3D points (`pt3d_68`) with its exact closest surface "
    "point; 'ICP corr.' (the VRN paper's protocol) measures that distance unaligned up to one z shift, 'rigid' "
    "after the rigid alignment (forgives pose); / 3D outer interocular distance; depth error: surface z at "
    "the GT x, y vs GT z (median offset removed), hidden points included (a floor for every method)\n"
    "- baselines: 'port mesh' = the 3DDFA_V2 port's dense mesh (offline: the stand-in, mean face + landmark "
    "spline); 'posed mean face' = the mean face with the port's pose and scale\n"
    "- pose error: |predicted - `Pose_Para`| in degrees per angle (wrapped), AFLW2000-3D's convention; VRN: "
    "the BFM mean face fitted to the predicted front surface, seeded by the crop's landmarks "
    "(docs/pose_and_landmarks.md); port: the 3DDFA_V2 port's camera rotation on 3DDFA's `roi_box`; 'pose fit "
    "on the GT volume' (with `data.bfm_path`): the same fit on the .mat fit's volume, a check of the computation; "
    "near |yaw| 90 pitch and roll trade off (gimbal lock), so the (60, 90] Euler errors overstate the error; "
    "'rotation' is the angle of the rotation between predicted and true pose, free of that\n"
)


def build_dataset(d: DictConfig, layout: VolumeLayout, max_samples: int | None = None) -> Dataset:
    """The evaluation dataset of a ``conf/eval_data/data`` config (a ``_target_`` of
    :mod:`vrn.eval_datasets`), built with the checkpoint's layout."""
    return instantiate(d, layout=layout, max_samples=max_samples)


# --------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------


def _f(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def score_sample(
    s: EvalSample,
    prob: np.ndarray,
    threshold: float = 0.5,
    depth_factor: float = DEFAULT_LAYOUT.depth_factor,
    icp: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """All metrics of one sample.

    Args:
        s: the sample.
        prob: (D, H, W) float predicted probabilities (crop px).
        threshold: occupancy / iso level.
        depth_factor: depth bins per crop px (the checkpoint's layout).
        icp: :func:`vrn.nme.surface_nme` settings (max_iterations, tolerance, fit_subsample).
    Returns:
        a JSON-ready row: id, yaw, bucket, the metrics (None when not applicable), n_verts,
        no_surface, info.
    """
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
    if s.benchmark is not None and s.gt_landmarks is not None:
        mesh = (verts, faces) if len(faces) else None
        row.update(score_benchmark(s.gt_landmarks, mesh, s.benchmark, int((icp or {}).get("max_iterations", 50))))
    _score_pose(row, s, prob, threshold, depth_factor, len(faces) > 0)
    if len(faces) == 0:
        return row
    row["confidence_mean"] = _f(float(vertex_confidence(prob, s.transform.apply(verts), depth_factor).mean()))
    iod = interocular_distance(s.gt_landmarks) if s.gt_landmarks is not None else float("nan")
    if s.gt_verts is not None and len(s.gt_verts) and math.isfinite(iod) and iod > 0:
        r = surface_nme(verts, s.gt_verts, iod, **(icp or {}))
        row["nme_icp"], row["nme_rigid"] = _f(r.nme_icp), _f(r.nme_rigid)
        row["icp_iterations"] = r.icp.iterations
    row["nme_lmk_surf"] = _landmarks_to_surface(s, row, verts, faces, icp)
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


def _landmarks_to_surface(
    s: EvalSample, row: dict[str, Any], verts: np.ndarray, faces: np.ndarray, icp: dict[str, Any] | None
) -> float | None:
    """``nme_lmk_surf``: the 68 ground-truth 3D landmarks against the predicted surface, the AFLW2000-3D
    benchmark's VRN surface metric (:func:`vrn.aflw_benchmark.surface_landmark_nme`, ICP corr., / 3D
    outer interocular distance) on any dataset with 3D landmarks, so that a val split scores models
    the way the benchmark does: hidden landmarks count, unlike ``nme_icp`` on packed data (the
    camera-facing GT surface only). Equal to ``bench_surf_vrn`` where the benchmark ran (reused);
    absent landmarks (NaN rows) are left out, None without both outer eye corners."""
    if row.get("bench_surf_vrn") is not None:
        return row["bench_surf_vrn"]
    if s.gt_landmarks is None:
        return None
    g = np.asarray(s.gt_landmarks, np.float64)
    iod = interocular_distance(g)  # NaN when an outer eye corner is absent
    ok = np.isfinite(g).all(axis=1)  # e.g. the SFM's two undefined inner-mouth points
    if not (math.isfinite(iod) and iod > 0) or ok.sum() < 3:
        return None
    r = surface_landmark_nme(g[ok], verts, faces, int((icp or {}).get("max_iterations", 50)), iod=iod)
    return _f(r.icp_corr)


def _score_pose(
    row: dict[str, Any], s: EvalSample, prob: np.ndarray, threshold: float, depth_factor: float, surface: bool
) -> None:
    """Pose errors (VRN's template fit, the port's camera, and the same fit on the ground-truth
    volume where there is one) against ``s.pose_deg``, and the 68-landmark 3D NME of the fit's
    landmarks (:mod:`vrn.pose_landmarks`), into ``row``."""
    marks = None
    if surface and s.pred_landmarks_xy is not None and s.transform is not None:
        occ = np.asarray(prob) > threshold
        marks = estimate_pose_landmarks(occ, s.transform, s.pred_landmarks_xy, depth_factor=depth_factor)
    pred = None if marks is None else np.array([marks.pose.pitch, marks.pose.yaw, marks.pose.roll])
    port = (s.benchmark or {}).get("port_pose_deg")
    if s.pose_deg is not None:
        row.update(pose_errors(pred, s.pose_deg, "vrn"))
        row.update(pose_errors(port, s.pose_deg, "port"))
        row["pose_gt_deg"] = [round(float(v), 2) for v in s.pose_deg]
    if pred is not None:
        row["pose_vrn_deg"] = [round(float(v), 2) for v in pred]
    if port is not None:
        row["pose_port_deg"] = [round(float(v), 2) for v in port]
    if s.pose_deg is not None and s.gt_code is not None and s.pred_landmarks_xy is not None and s.transform is not None:
        check = estimate_pose_landmarks(decode(s.gt_code), s.transform, s.pred_landmarks_xy, depth_factor=depth_factor)
        gt_fit = None if check is None else np.array([check.pose.pitch, check.pose.yaw, check.pose.roll])
        row.update(pose_errors(gt_fit, s.pose_deg, "gtvol"))
    if marks is not None and s.gt_landmarks is not None:
        norm = landmark_box_size(s.gt_landmarks)
        if math.isfinite(norm) and norm > 0:
            row["nme_lmk_3d_fit"] = _f(landmark_nme(marks.landmarks_3d, s.gt_landmarks, norm))


def _collate(batch: list[EvalSample]) -> list[EvalSample]:
    return batch


def _guidance(rec: Reconstructor, samples: list[EvalSample]) -> np.ndarray | None:
    """(B, 68, 2) crop px landmarks of the samples for a guided network (the landmarks the crop
    was cut with: the detector's, or the packed row's), else None.

    Raises:
        ValueError: a guided network and a sample without landmarks.
    """
    if not rec.needs_landmarks:
        return None
    missing = [s.id for s in samples if s.pred_landmarks_xy is None]
    if missing:
        raise ValueError(
            f"model {rec.model_spec.get('name')} is guided by 68 landmarks, but samples {missing[:3]} have none: "
            f"evaluate it on a dataset whose samples carry landmarks (packed rows with 'landmarks', aflw2000_3d)"
        )
    return np.stack([s.transform.apply(s.pred_landmarks_xy) for s in samples]).astype(np.float32)  # type: ignore[union-attr]


def _score_all(rec: Reconstructor, ds: Dataset, cfg: DictConfig) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Run the network on every sample and score it: (per-sample rows, load failures)."""
    loader = DataLoader(
        ds,
        batch_size=int(cfg.batch_size),
        shuffle=False,
        num_workers=int(cfg.get("num_workers", 0)),
        collate_fn=_collate,
    )
    icp_cfg = OmegaConf.to_container(cfg.icp, resolve=True) if cfg.get("icp") else {}
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    for batch in loader:
        ok = [s for s in batch if s.error is None]
        failures += [{"id": s.id, "error": str(s.error)} for s in batch if s.error is not None]
        if not ok:
            continue
        probs = rec.reconstruct_crops(np.stack([s.crop for s in ok]), _guidance(rec, ok))
        for s, p in zip(ok, probs):
            row = score_sample(s, p.numpy(), rec.threshold, rec.layout.depth_factor, icp_cfg)  # type: ignore[arg-type]
            rows.append(row)
            log.info(
                f"{s.id}: yaw {row['yaw'] if row['yaw'] is None else round(row['yaw'], 1)} "
                + " ".join(f"{k}={row[k]:.4f}" for k, *_ in METRICS if row.get(k) is not None)
            )
    return rows, failures


def _counts(values: Any) -> str:
    """``"a (3), b (1)"``: each distinct value with its count, sorted by value."""
    return ", ".join(f"{k} ({v})" for k, v in sorted(Counter(values).items()))


def _notes(cfg: DictConfig, rec: Reconstructor, rows: list[dict[str, Any]], n_failed: int, ds: Dataset) -> list[str]:
    """The report's bullet points: what was evaluated (with the dataset's detector and what the
    crops were cut from, where it has them) and how each metric is defined."""
    n_empty = sum(bool(r["no_surface"]) for r in rows)
    cuts_crops = bool(getattr(ds, "cuts_crops", False))
    detector = getattr(ds, "detector", None)
    provenance = []
    cut_from = _counts(str(r["info_crop"]) for r in rows if r.get("info_crop"))
    if cut_from:
        provenance.append(f"crops cut from: {cut_from}")
    if detector is not None and hasattr(detector, "describe"):
        provenance.append(f"detector: {json.dumps(detector.describe(), sort_keys=True)}")
    if not cuts_crops:
        crops = "as packed"
    elif rec.layout.source_roi_px:
        crops = f"through 3DDFA's {rec.layout.source_roi_px} px ROI (vrn.geometry.crop.crop_for_layout)"
    else:
        crops = "from the photo"
    return [
        f"checkpoint: `{cfg.ckpt}` (model {rec.model_spec.get('name')}), threshold {rec.threshold}, "
        f"precision {rec.precision}, device {rec.device}, input crops {crops}"
        + (", flip test-time augmentation" if rec.flip_tta else ""),
        f"data: `{cfg.data_name}` ({len(rows)} samples scored, {n_failed} failed to load, "
        f"{n_empty} with an empty prediction: their NMEs are missing, IoU counts)",
        *provenance,
        "surface NME: mean GT-vertex -> nearest predicted vertex distance / 3D outer interocular distance; "
        "'ICP corr.' = ICP finds the pairs, distances unaligned up to a z shift (VRN paper); "
        "'rigid' = after the rigid alignment",
        "68-lmk NME: / sqrt(w*h) of the GT landmark box; z of each landmark read from the predicted (front) "
        "surface, z offset removed; '51-lmk' leaves out the 17 jaw-contour points, which the cheek often hides "
        "(their front-surface depth is wrong even for a perfect volume); landmark x, y from: "
        + (_counts(r["landmarks_xy_from"] for r in rows) or "-")
        + " (2D NME only where they come from a detector)",
        "yaw buckets by |yaw|; 'balanced' = mean of the three bucket means (reported only when all three have data)",
    ]


#: the per-face error that the confidence is checked against, first present wins
CALIBRATION_ERRORS: list[tuple[str, str]] = [
    ("bench_surf_vrn", "68 GT points to surface, ICP corr."),
    ("nme_icp", "surface NME, ICP corr."),
]


def confidence_section(rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The report's "Face confidence vs error" section and its JSON: per yaw bucket and over all
    faces, :func:`vrn.confidence_calibration.confidence_vs_error` of ``confidence_mean``
    against the first error of :data:`CALIBRATION_ERRORS` the rows have. ("", {}) when the
    rows have no confidence or no such error."""
    key = next((k for k, _ in CALIBRATION_ERRORS if any(r.get(k) is not None for r in rows)), None)
    if key is None or not any(r.get("confidence_mean") is not None for r in rows):
        return "", {}
    label = dict(CALIBRATION_ERRORS)[key]

    def values(rs: list[dict[str, Any]], k: str) -> np.ndarray:
        return np.array([np.nan if r.get(k) is None else float(r[k]) for r in rs], np.float64)

    groups = {b: rs for b, rs in rows_by_yaw_bucket(rows).items() if rs}  # the summary table's buckets
    groups["all"] = rows
    stats = {b: confidence_vs_error(values(rs, "confidence_mean"), values(rs, key)) for b, rs in groups.items()}

    def cell(v: float, fmt: str) -> str:
        return "-" if not math.isfinite(v) else format(v, fmt)

    low = f"lowest-confidence {100 * DEFAULT_FRACTION:.0f} %"
    lines = [
        f"| yaw | faces | Spearman (confidence, error) | {low} among the {100 * DEFAULT_FRACTION:.0f} % worst "
        f"(chance {DEFAULT_FRACTION:.2f}) | {label} (%), {low} | the other faces |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for b, st in stats.items():
        lines.append(
            f"| {b} | {st.n} | {cell(st.spearman, '+.2f')} | {cell(st.low_in_worst, '.2f')} "
            f"| {cell(100 * st.error_low, '.2f')} | {cell(100 * st.error_rest, '.2f')} |"
        )
    md = (
        "\n## Face confidence vs error\n\n"
        f"Each face's `confidence_mean` (mean vertex confidence, vrn.volume.confidence) against its {label} "
        "(vrn.confidence_calibration; a negative Spearman means low confidence goes with large error; "
        f"'-' below {MIN_FACES} faces).\n\n" + "\n".join(lines) + "\n"
    )
    return md, {"error": key, **{b: st.to_dict() for b, st in stats.items()}}


def _log_wandb(cfg: DictConfig, results: dict[str, Any], present: list[tuple[str, str, float, int]]) -> None:
    """The summary to W&B (``wandb=true``): a table (bucket x metric) and ``<bucket>/<metric>`` scalars."""
    import wandb

    started = start_run(
        str(cfg.get("wandb_project", "vrn-eval")),
        Path(str(cfg.output_dir)),
        "evaluate",
        config=OmegaConf.to_container(cfg, resolve=True),
    )  # type: ignore[arg-type]
    try:
        keys = [m[0] for m in present]
        summary = results["summary"]
        table = wandb.Table(
            columns=["bucket", "n"] + keys,
            data=[[b, summary[b].get("n")] + [summary[b].get(k) for k in keys] for b in summary],
        )
        scalars = {f"{b}/{k}": summary[b][k] for b in summary for k in keys if summary[b].get(k) is not None}
        wandb.log({"results": table, **scalars})
    finally:
        if started:
            finish_run()


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluation of a composed ``conf/eval_data/evaluate.yaml``; returns the results
    dict (also written to ``output_dir/results.json`` and ``results.md``)."""
    out_dir = Path(os.path.expanduser(str(cfg.output_dir)))
    check_device(str(cfg.device))
    made = prepare_output_dir(out_dir)
    try:
        return _evaluate(cfg, out_dir)
    except BaseException:
        remove_empty(made)  # no empty output folders after a failure
        raise


def _evaluate(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    rec = Reconstructor.from_run_config(cfg)
    ds = build_dataset(cfg.data, rec.layout, cfg.get("max_samples"))
    log.info(f"Evaluating {rec!r} on data={cfg.data_name} ({len(ds)} samples)")
    t0 = time.perf_counter()
    rows, failures = _score_all(rec, ds, cfg)
    dt = time.perf_counter() - t0
    summary = summarize(rows, [m[0] for m in METRICS] + [c[0] for c in BENCHMARK_COLUMNS])
    present = [m for m in METRICS if summary["all"].get(m[0]) is not None]
    notes = _notes(cfg, rec, rows, len(failures), ds)
    table = markdown_table(summary, present) if present else "(no metric could be computed)\n"
    md = "# VRN evaluation\n\n" + "\n".join(f"- {n}" for n in notes) + "\n\n" + table
    if any(summary["all"].get(c[0]) is not None for c in BENCHMARK_COLUMNS):
        md += (
            "\n## AFLW2000-3D benchmark (3DDFA's arrays and yaw buckets)\n\n"
            + benchmark_table(summary)
            + "\n"
            + BENCHMARK_NOTES
        )
    calibration_md, calibration = confidence_section(rows)
    md += calibration_md
    results = {
        "summary": summary,
        "confidence_calibration": calibration,
        "metrics": [m[0] for m in present],
        "notes": notes,
        "seconds": dt,
        "ckpt": str(cfg.ckpt),
        "model": rec.model_spec,
        "layout": rec.layout.to_dict(),
        "data_name": str(cfg.data_name),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "failures": failures,
        "samples": rows,
    }
    atomic_write(out_dir / "results.json", json.dumps(results, indent=2).encode())
    atomic_write(out_dir / "results.md", md.encode())
    print(md, flush=True)
    log.info(f"Results: {out_dir / 'results.md'} ({dt:.1f} s)")
    if cfg.get("wandb", False):
        _log_wandb(cfg, results, present)
    return results


@hydra.main(version_base="1.3", config_path="../conf/eval_data", config_name="evaluate.yaml")
def main(cfg: DictConfig) -> None:
    run_cli("vrn.evaluate", lambda: evaluate(cfg))


if __name__ == "__main__":
    main()
