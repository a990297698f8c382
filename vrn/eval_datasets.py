"""The evaluation datasets of ``python -m vrn.evaluate`` (one per ``conf/eval_data/data/*.yaml``).

Each config is a ``_target_`` that :func:`hydra.utils.instantiate` builds, with the
checkpoint's :class:`~vrn.conventions.VolumeLayout` and ``max_samples`` passed in by
:func:`vrn.evaluate.build_dataset`. Every dataset yields :class:`EvalSample` items:

* :class:`PackedEvalDataset`: any packed folder (``data=folder``): its packed crops (crop px =
  image px), or (``data.crop=detector``) its source photos through the detector and crop rule.
* :func:`synthetic_test_set`: the synthetic test split of the *training* data config
  (``data=synthetic``): the training cache when it exists, else only the test split is
  rendered (sample ``i`` is the same either way).
* :class:`AFLW2000Dataset`: AFLW2000-3D ``.jpg`` + ``.mat`` pairs (``data=aflw2000_3d``),
  cropped and voxelised with the checkpoint's layout.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from torch.utils.data import Dataset

from vrn.aflw_benchmark import BENCHMARK_FILE, BenchmarkArrays, load_benchmark, port_meshes
from vrn.conventions import DEFAULT_LAYOUT, VolumeLayout
from vrn.data.datamodule import SyntheticDataModule
from vrn.data.packed import PackedReader
from vrn.data.synthetic import cache_name, generate_packed
from vrn.detectors import FaceDetector, get_detector
from vrn.detectors.tddfa import port_landmarks
from vrn.face_models.bfm import dense_model_shape, load_dense_bfm, rotation_to_crop_frame
from vrn.face_models.mat_fit import angles_to_matrix_3ddfa, load_mat_fit, mat_fit_points
from vrn.face_models.tddfa_models import load_tddfa
from vrn.geometry.crop import crop_for_layout
from vrn.geometry.head_pose import pose_angles_from_rotation
from vrn.geometry.transforms import CropTransform
from vrn.image_io import read_image_rgb
from vrn.nme import yaw_from_rotation
from vrn.volume.codec import VolumeCode
from vrn.volume.surface import front_depth_of_code, front_surface_points
from vrn.volume.voxelize import solid_depth_shift, voxelize_face

log = logging.getLogger(__name__)

__all__ = ["EvalSample", "PackedEvalDataset", "AFLW2000Dataset", "synthetic_test_set"]

_IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def _build_detector(detector: FaceDetector | str | None, device: str) -> FaceDetector:
    """The detector of a ``crop=detector`` dataset: given, or built from its registered name."""
    if detector is None:
        raise ValueError("data.crop=detector needs a detector")
    return get_detector(detector, device=str(device)) if isinstance(detector, str) else detector


def detector_landmarks(
    detector: FaceDetector, image: np.ndarray, path: Path, gt_lm: np.ndarray
) -> tuple[np.ndarray | None, str, str]:
    """The detected face nearest the annotated one (the datasets annotate one face per row).

    Args:
        detector: any :class:`~vrn.detectors.FaceDetector`.
        image: (H, W, 3) uint8 RGB photo.
        path: the photo's path (detector caches and messages).
        gt_lm: (68, 2 or 3) annotated landmarks, image px.
    Returns:
        (68, 2) detected landmark x, y (image px) or None when no face was found, where they
        came from ("detector" / "ground truth"), and a crop note for the report.
    """
    dets = detector.detect(image, str(path))
    if not dets:
        return None, "ground truth", "gt (no face detected)"
    c_gt = (gt_lm[:, :2].min(0) + gt_lm[:, :2].max(0)) / 2
    d = min(dets, key=lambda d: float(np.linalg.norm((d.box[:2] + d.box[2:]) / 2 - c_gt)))
    return np.asarray(d.landmarks, np.float64), "detector", "detector"


@dataclass
class EvalSample:
    """One evaluation sample, everything in image px unless said otherwise.

    Attributes:
        id: sample name.
        crop: (S, S, 3) uint8 RGB network input (S = the layout's ``crop_size``).
        transform: image px -> crop px (identity for packed crops).
        yaw: degrees (bucket by |yaw|).
        gt_code: ground-truth occupancy (crop px, the layout's depth bins) for the IoU, or None.
        gt_verts: (N, 3) ground-truth surface points for the surface NME, or None.
        gt_landmarks: (68, 3) ground-truth landmarks (NaN rows = absent), or None.
        pred_landmarks_xy: (68, 2) x, y of the predicted landmarks, or None.
        landmarks_xy_from: "detector" or "ground truth" (then the 2D NME is not reported).
        info: provenance (crop source, GT mesh source, ...).
        error: set when the sample could not be prepared (then it is counted and skipped).
        benchmark: 3DDFA's benchmark arrays of this face and the port's baselines
            (:func:`vrn.aflw_benchmark.score_benchmark`), or None.
        pose_deg: (3,) ground-truth head pose (pitch, yaw, roll) degrees, ``Pose_Para``
            convention (:mod:`vrn.geometry.head_pose`), or None.
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
    benchmark: dict[str, Any] | None = None
    pose_deg: np.ndarray | None = None


class PackedEvalDataset(Dataset):
    """Samples of a packed folder.

    ``crop="packed"``: the packed crops as they are (crop px = image px), guided by the rows'
    landmarks. ``crop="detector"``: the whole photo path on the rows' *source photos*
    (``source_root / row["source_image"]``): detect, cut the crop with the model's rule, and
    score in photo px against the packed target mapped back through the row's ``transform``
    (source px -> packed crop px). This measures detector + crop + model on a split that is not
    a benchmark (e.g. AFLW val); the voxel IoU is then not reported (different crop frames).

    Args:
        root: packed folder.
        split: manifest split ("test"); None or "all" = all rows.
        max_samples: keep the first N.
        layout: the model's layout; the folder's (``meta.json``) must match it.
        crop: "packed" or "detector".
        detector: a ``FaceDetector`` or registered detector name (built only for crop="detector").
        detector_device: the detector's device when built from a name.
        source_root: folder of the rows' ``source_image`` files (crop="detector").
        source_margin: crop="detector" pads each source photo on every side by this fraction
            of its longer side with mid-grey before detecting, for tight source crops such as
            the 120 px AFLW ones (FaceBoxes needs context); 0 for whole photos.
    Raises:
        vrn.conventions.LayoutMismatchError: the folder was packed with another layout.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = "test",
        max_samples: int | None = None,
        layout: VolumeLayout = DEFAULT_LAYOUT,
        crop: str = "packed",
        detector: FaceDetector | str | None = None,
        detector_device: str = "cpu",
        source_root: str | os.PathLike | None = None,
        source_margin: float = 0.0,
    ) -> None:
        split = None if split in (None, "all") else str(split)
        self.reader = PackedReader(Path(os.path.expanduser(str(root))), split=split)
        self.reader.layout.check_matches(layout, f"dataset {root}", "the checkpoint")
        if len(self.reader) == 0:
            raise ValueError(f"{root} has no samples in split '{split}'")
        self.n = len(self.reader) if max_samples is None else min(len(self.reader), int(max_samples))
        self.depth_factor = layout.depth_factor
        self.layout = layout
        self.root = str(root)
        if crop not in ("packed", "detector"):
            raise ValueError(f"data.crop must be 'packed' or 'detector', got {crop!r}")
        self.crop = crop
        #: crops cut from the source photos with the layout (reported by vrn.evaluate)
        self.cuts_crops = crop == "detector"
        self.detector: FaceDetector | None = None
        self.source_root: Path | None = None
        self.source_margin = float(source_margin)
        if crop == "detector":
            if source_root in (None, "", "null"):
                raise ValueError(
                    "data.crop=detector needs data.source_root: the folder of the packed rows' source "
                    "photos (the pipeline's input_dir)"
                )
            self.source_root = Path(os.path.expanduser(str(source_root)))
            if not self.source_root.is_dir():
                raise FileNotFoundError(f"data.source_root={self.source_root} is not a folder")
            if not 0.0 <= self.source_margin <= 4.0:
                raise ValueError(f"data.source_margin must be in [0, 4] (share of the photo side), got {source_margin}")
            self.detector = _build_detector(detector, detector_device)

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
        sample = EvalSample(
            id=str(row.get("id", i)),
            crop=s.image,
            transform=CropTransform(_IDENTITY, s.image.shape[:2]),
            yaw=yaw,
            gt_code=s.code,
            gt_verts=front_surface_points(front_depth_of_code(s.code), self.depth_factor),
            gt_landmarks=lm,
            pred_landmarks_xy=None if lm is None else lm[:, :2].copy(),
            landmarks_xy_from="ground truth",
            info={"source": str(row.get("source", "packed")), "gt_surface": "front surface of the GT volume"},
        )
        return self._through_detector(sample, row) if self.crop == "detector" else sample

    def _through_detector(self, s: EvalSample, row: dict[str, Any]) -> EvalSample:
        """``s`` (packed crop px) re-cut from its source photo by the detector, GT in photo px."""
        name, to_packed = row.get("source_image"), row.get("transform")
        if not name or to_packed is None or s.gt_landmarks is None:
            return EvalSample(s.id, None, None, s.yaw, error="row lacks source_image, transform or 68 3D landmarks")
        path = self.source_root / str(name)  # type: ignore[operator]
        try:
            source = read_image_rgb(path)
        except Exception as e:  # noqa: BLE001 - unreadable photo: recorded as a failed sample
            return EvalSample(s.id, None, None, s.yaw, error=f"{type(e).__name__}: {e}")
        m = int(round(self.source_margin * max(source.shape[:2])))
        photo = cv2.copyMakeBorder(source, m, m, m, m, cv2.BORDER_CONSTANT, value=(128, 128, 128)) if m else source
        # photo px -> source px (the margin) -> packed crop px (the row's transform)
        unpad = CropTransform(np.array([[1.0, 0.0, -m], [0.0, 1.0, -m]]), source.shape[:2])
        photo_to_packed = CropTransform.from_dict(to_packed).compose(unpad)
        gt_lm = photo_to_packed.apply_inverse(s.gt_landmarks)
        xy, xy_from, crop_info = detector_landmarks(self.detector, photo, path, gt_lm)  # type: ignore[arg-type]
        xy = gt_lm[:, :2] if xy is None else xy
        crop, T = crop_for_layout(photo, xy, self.layout)
        return EvalSample(
            s.id,
            crop,
            T,
            s.yaw,
            gt_verts=photo_to_packed.apply_inverse(s.gt_verts),  # type: ignore[arg-type]
            gt_landmarks=gt_lm,
            pred_landmarks_xy=xy,
            landmarks_xy_from=xy_from,
            info={**s.info, "image": str(name), "crop": crop_info, "source_margin_px": m},
        )


def synthetic_test_set(
    datamodule: SyntheticDataModule,
    split: str = "test",
    max_samples: int | None = None,
    layout: VolumeLayout = DEFAULT_LAYOUT,
) -> PackedEvalDataset:
    """The synthetic test split of a training data config: the training cache when present,
    else a test-only cache (rendered once; test sample ``i`` depends only on the generator
    settings, ``gen_seed`` and ``i``).

    Args:
        datamodule: the training ``data=synthetic`` datamodule (its generator settings, counts,
            seed and cache folder; nothing is generated by building it).
        split, max_samples, layout: see :class:`PackedEvalDataset`.
    """
    full = Path(datamodule.root)
    if (full / "meta.json").is_file():
        return PackedEvalDataset(full, split=split, max_samples=max_samples, layout=layout)
    only = {"train": 0, "val": 0, "test": datamodule.counts["test"]}
    root = full.parent / cache_name(datamodule.gen_cfg, only, datamodule.gen_seed)
    if not (root / "meta.json").is_file():
        log.info(f"Rendering the synthetic test split ({only['test']} faces) into {root}")
        generate_packed(root, datamodule.gen_cfg, only, seed=datamodule.gen_seed, workers=datamodule.num_gen_workers)
    return PackedEvalDataset(root, split=split, max_samples=max_samples, layout=layout)


class AFLW2000Dataset(Dataset):
    """AFLW2000-3D: ``<name>.jpg`` + ``<name>.mat`` pairs in a folder.

    Args:
        root: the folder.
        bfm_path: None (landmark NME only), "standin" (the offline stand-in: mean face +
            landmark spline; for testing the code path, NOT a benchmark), or the path of
            face3d's ``BFM.mat`` / 3DDFA_V2's ``bfm_noneck_v3.pkl`` (dense GT mesh).
        crop: "detector" (crop and landmark x, y from ``detector``; falls back to the
            ground-truth crop when no face is found: the user's path), "roi_box" (3DDFA's
            protocol: the 3DDFA_V2 port on the benchmark's ``roi_box``, the input every
            3DDFA-family number and the two baselines get; needs ``benchmark.npz``) or "gt"
            (crop from ``pt3d_68``).
        detector: a ``FaceDetector`` or a registered detector name (built only for crop="detector").
        detector_device: the detector's device when built from a name.
        max_samples: keep the first N images (sorted by name).
        layout: the model's layout: the crop rule (``crop_size``, ``face_size``) and the
            ground-truth volume (``depth_bins``, ``depth_factor``).
        benchmark: with 3DDFA's ``benchmark.npz`` in ``root`` (:mod:`vrn.aflw_benchmark`):
            evaluate exactly its images, bucket by its ``pose``, and add its metrics.
        baselines: with the benchmark arrays, also run the 3DDFA_V2 port on each ``roi_box``
            (3DDFA's protocol) for its 2D NME and the two baseline meshes (port mesh, posed
            mean face).
        roi_box_flip: with ``crop="roi_box"``, the model's crop and guidance landmarks are the
            port's on the ``roi_box`` averaged with its landmarks on the mirrored photo
            (:func:`vrn.detectors.tddfa.port_landmarks` with ``flip``, as the ``tddfa``
            detectors' ``flip: true``); the baselines keep the port's one pass.
    """

    #: the crops are cut from the photos with the layout (:func:`vrn.geometry.crop.crop_for_layout`)
    cuts_crops = True

    def __init__(
        self,
        root: str | os.PathLike,
        bfm_path: str | None = None,
        crop: str = "detector",
        detector: FaceDetector | str | None = None,
        detector_device: str = "cpu",
        max_samples: int | None = None,
        layout: VolumeLayout = DEFAULT_LAYOUT,
        benchmark: bool = True,
        baselines: bool = True,
        roi_box_flip: bool = False,
    ) -> None:
        self.root = Path(os.path.expanduser(str(root)))
        self.roi_box_flip = bool(roi_box_flip)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"data.root={self.root} is not a folder: point it at your AFLW2000-3D folder (image*.jpg + image*.mat)"
            )
        self.images = sorted(p for p in self.root.glob("*.jpg") if p.with_suffix(".mat").is_file())
        if not self.images:
            raise FileNotFoundError(f"data.root={self.root} holds no .jpg + .mat pairs (AFLW2000-3D layout)")
        self.arrays: BenchmarkArrays | None = load_benchmark(self.root) if benchmark else None
        if self.arrays is not None:
            self.images = [p for p in self.images if self.arrays.row(p.stem) is not None]
            if not self.images:
                raise FileNotFoundError(f"data.root={self.root}: none of its images is in {BENCHMARK_FILE}")
        self.baselines = bool(baselines) and self.arrays is not None
        self._port = None
        if max_samples is not None:
            self.images = self.images[: int(max_samples)]
        if crop not in ("detector", "roi_box", "gt"):
            raise ValueError(f"data.crop must be 'detector', 'roi_box' or 'gt', got {crop!r}")
        if crop == "roi_box" and self.arrays is None:
            raise ValueError(f"data.crop=roi_box needs 3DDFA's {BENCHMARK_FILE} in data.root={self.root}")
        if self.roi_box_flip and crop != "roi_box":
            raise ValueError(
                f"data.roi_box_flip=true only applies with data.crop=roi_box (got data.crop={crop}); with "
                f"data.crop=detector set the detector's own flip (data.detector.flip) instead"
            )
        self.crop = crop
        self.detector = _build_detector(detector, detector_device) if crop == "detector" else None
        self.bfm_path = None if bfm_path in (None, "", "null", "none") else str(bfm_path)
        self.layout = layout
        self._bfm = None

    def __len__(self) -> int:
        return len(self.images)

    def _load_bfm(self) -> Any:
        if self._bfm is None:
            self._bfm = (
                load_dense_bfm(None, "offline_standin") if self.bfm_path == "standin" else load_dense_bfm(self.bfm_path)
            )
        return self._bfm

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_bfm": None, "_port": None}

    def _port_on_roi_box(self, name: str, image: np.ndarray) -> Any:
        """The 3DDFA_V2 port's result on the face's benchmark ``roi_box`` (3DDFA's protocol)."""
        assert self.arrays is not None
        if self._port is None:
            self._port = load_tddfa()
        return self._port.from_roi_boxes(image, [self.arrays.roi_box[self.arrays.row(name)]])[0]

    def _benchmark_for(self, name: str, image: np.ndarray, res: Any = None) -> dict[str, Any]:
        """The face's benchmark arrays, and (``baselines``) the port's landmarks and meshes on its
        roi_box (``res``: that port result when already computed)."""
        assert self.arrays is not None
        i = self.arrays.row(name)
        bench: dict[str, Any] = {
            "pts68": self.arrays.pts68[i],
            "pts68_reannotated": self.arrays.pts68_reannotated[i],
            "roi_box": self.arrays.roi_box[i],
            "yaw_abs_deg": float(self.arrays.yaw_abs_deg[i]),
        }
        if self.baselines:
            res = self._port_on_roi_box(name, image) if res is None else res
            bench["port_pts68"] = res.pts68
            bench["port_pose_deg"] = np.array(pose_angles_from_rotation(res.R, model_frame=True))
            bench["meshes"] = port_meshes(res, self._port.bfm)
        return bench

    def _crop_landmarks(self, image: np.ndarray, path: Path, gt_lm: np.ndarray) -> tuple[np.ndarray | None, str, str]:
        """(68, 2) landmark x, y of the crop (None = ground truth), where they came from, crop info."""
        if self.crop != "detector":
            return None, "ground truth", "gt"
        return detector_landmarks(self.detector, image, path, gt_lm)  # type: ignore[arg-type]

    def _add_dense_gt(self, s: EvalSample, mat: dict[str, Any], pose: np.ndarray, height: int) -> None:
        """The dense GT mesh of the ``.mat`` fit (image px) and its solid voxelised in the crop."""
        bfm = self._load_bfm()
        dense, _lms, how = dense_model_shape(bfm, mat["Shape_Para"], mat["Exp_Para"])
        verts = mat_fit_points(dense, pose, height)  # (V, 3) image px, z toward the camera
        s.gt_verts = verts
        R = rotation_to_crop_frame(angles_to_matrix_3ddfa(pose[0], pose[1], pose[2]))
        vc = s.transform.apply(verts)  # type: ignore[union-attr]
        tri = np.asarray(bfm.tri, np.int32)
        L = self.layout
        # the project's convention (as the pipeline's fit stage): the target solid centred in depth
        vc[:, 2] += solid_depth_shift(vc, tri, R, depth_bins=L.depth_bins, depth_factor=L.depth_factor)
        s.gt_code = voxelize_face(
            vc.astype(np.float32), tri, R, depth_bins=L.depth_bins, depth_factor=L.depth_factor, size=L.crop_size
        )
        s.info["gt_mesh"] = f"{bfm.source} ({how})"

    def __getitem__(self, i: int) -> EvalSample:
        path = self.images[i]
        sid = path.stem
        try:
            image = read_image_rgb(path)
            mat = load_mat_fit(path.with_suffix(".mat"))
        except Exception as e:  # noqa: BLE001 - unreadable image or .mat: recorded as a failed sample
            return EvalSample(sid, None, None, float("nan"), error=f"{type(e).__name__}: {e}")
        pose = np.asarray(mat["Pose_Para"], np.float64).ravel()
        yaw = float(np.degrees(pose[1]))
        if "pt3d_68" not in mat:
            return EvalSample(sid, None, None, yaw, error="no pt3d_68 in the .mat")
        p3 = np.asarray(mat["pt3d_68"], np.float64)
        gt_lm = np.stack([p3[0] - 1.0, p3[1] - 1.0, p3[2]], 1)  # MATLAB 1-based -> 0-based pixel centres
        port_res = None
        if self.crop == "roi_box":
            port_res = self._port_on_roi_box(sid, image)
            xy, xy_from, crop_info = np.asarray(port_res.pts68[:2].T, np.float64), "detector", "port on roi_box"
            if self.roi_box_flip:
                box = self.arrays.roi_box[self.arrays.row(sid)]  # type: ignore[union-attr]
                xy = port_landmarks(self._port, image, box[None], refine=False, flip=True, roi=True, unflipped=[xy])[0]
                crop_info = "port on roi_box, flip averaged"
        else:
            xy, xy_from, crop_info = self._crop_landmarks(image, path, gt_lm)
        xy = gt_lm[:, :2] if xy is None else xy
        crop, T = crop_for_layout(image, xy, self.layout)
        s = EvalSample(
            sid,
            crop,
            T,
            yaw,
            gt_landmarks=gt_lm,
            pred_landmarks_xy=xy,
            landmarks_xy_from=xy_from,
            info={"image": path.name, "crop": crop_info},
            pose_deg=np.degrees(pose[:3]),
        )
        if self.bfm_path is not None:
            self._add_dense_gt(s, mat, pose, image.shape[0])
        if self.arrays is not None:
            s.benchmark = self._benchmark_for(sid, image, port_res)
            s.yaw = s.benchmark["yaw_abs_deg"]  # 3DDFA's buckets come from the arrays' pose
        return s
