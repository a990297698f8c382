"""Reconstructor: photo -> one textured VRN mesh per face, in image px (the Python API).

::

    from vrn import Reconstructor

    rec = Reconstructor.from_checkpoint("outputs/train/runs/<run>/checkpoints/last.ckpt",
                                        device="cuda", precision="bf16", detector="fan")
    for face in rec("photo.jpg"):
        face.export("face.ply")                   # per-vertex colours from the photo

Pipeline per photo (each stage is a method, so batch front-ends such as :mod:`vrn.demo`
reuse them):

1. :func:`prepare_image`: read (RGB), detect faces + 68 landmarks (:mod:`vrn.detectors`),
   cut the VRN crop of each face (:func:`vrn.geometry.crop.crop_for_layout` with the checkpoint's
   :class:`~vrn.conventions.VolumeLayout`: ``crop_size`` x ``crop_size`` crop px, landmark box
   ``face_size`` crop px, through 3DDFA's resampled ROI when ``source_roi_px`` > 0, and the
   :class:`~vrn.geometry.transforms.CropTransform` image px -> crop px).
2. :meth:`Reconstructor.reconstruct_crops`: the network on a batch of crops, sigmoid ->
   occupancy probabilities (B, D, H, W), index ``[d, r, c]`` (:mod:`vrn.conventions`).
3. :func:`volume_to_image_mesh`: marching cubes at ``threshold`` (crop px, the z factor
   undone: ``z = (d + 0.5) / depth_factor``), then the inverse crop transform to image px
   (x, y through the inverse similarity, z divided by the crop scale, so z is in image px
   too, pointing toward the camera; its origin is the volume's back, mapped the same way).
4. :func:`sample_vertex_colors`: per-vertex RGB sampled (bilinear) from the photo.

Checkpoints: a Lightning checkpoint of :class:`vrn.lit_module.VRNLitModule` stores the
model spec in ``hyper_parameters["net"] = {"name": ..., **overrides}`` and the crop / volume
layout in ``hyper_parameters["layout"]``; the network is rebuilt from the spec with
:func:`vrn.models.create_model` (no Hydra), and the layout decides the crop and the depth
scale (:mod:`vrn.checkpoint`). :meth:`Reconstructor.save` writes a slim file of the same
structure (spec + layout + network weights only). URLs are downloaded
once into ``<vrn cache>/checkpoints/`` (``$VRN_CACHE_DIR`` or ``~/.cache/vrn``).

Backends: ``backend="torch"`` (default) runs the network with PyTorch; ``backend="onnxruntime"``
runs its ONNX export (:mod:`vrn.export`; ``pip install "vrn[onnx]"``), float32 only.
``Reconstructor.from_checkpoint("model.onnx")`` loads a file of ``python -m vrn.export``
(spec and layout from its metadata) with the onnxruntime backend.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vrn.assets import AssetNotFoundError
from vrn.checkpoint import (
    DEFAULT_PRETRAINED,
    PRETRAINED_MODELS,
    check_network_layout,
    layout_for_network,
    load_network,
    pretrained_path,
    resolve_model_file,
    save_network,
)
from vrn.cli_errors import UserError, check_device
from vrn.conventions import DEFAULT_LAYOUT, DEPTH_FACTOR, VolumeLayout
from vrn.detectors.base import DEFAULT_DETECTOR, Detection, FaceDetector, get_detector
from vrn.export import OnnxNetwork, is_onnx_file, onnx_bytes
from vrn.face_models.landmarks68 import N_LANDMARKS, mirror_landmarks
from vrn.geometry.crop import crop_for_layout
from vrn.geometry.head_pose import HeadPose
from vrn.geometry.transforms import CropTransform
from vrn.image_io import check_rgb_image, read_image_rgb
from vrn.pose_landmarks import PoseLandmarks, estimate_pose_landmarks
from vrn.volume.codec import VolumeCode, encode
from vrn.volume.confidence import vertex_confidence
from vrn.volume.mesh import export_mesh, volume_to_mesh

log = logging.getLogger(__name__)


__all__ = [
    "Reconstructor",
    "PRETRAINED_MODELS",
    "DEFAULT_PRETRAINED",
    "FaceResult",
    "PreparedImage",
    "prepare_image",
    "volume_to_image_mesh",
    "sample_vertex_colors",
    "PRECISIONS",
    "BACKENDS",
    "DEFAULT_FLIP_TTA",
]

#: ``flip_tta`` of the API and of a demo / evaluation config without the key (the configs'
#: ``flip_tta: true`` matches, tests/test_configs.py checks): on since the shipped model learnt
#: from flip-averaged targets (docs/benchmarks.md, session 10)
DEFAULT_FLIP_TTA = True

#: network runtimes: PyTorch, or the ONNX export run with onnxruntime (:mod:`vrn.export`)
BACKENDS = ("torch", "onnxruntime")

#: accepted ``precision`` values -> autocast dtype (None = plain float32)
PRECISIONS: dict[str, torch.dtype | None] = {
    "32": None,
    "32-true": None,
    "fp32": None,
    "bf16": torch.bfloat16,
    "bf16-mixed": torch.bfloat16,
    "16": torch.float16,
    "16-mixed": torch.float16,
    "fp16": torch.float16,
}
#: vertex colour (RGB) when no photo is given
_GREY = 200


# --------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------


@dataclass
class FaceResult:
    """One reconstructed face.

    Attributes:
        verts: (V, 3) float32 image px (x right, y down, z toward the camera; z in image
            px = crop z / ``transform.scale``). (0, 3) when the network predicted no surface.
        faces: (F, 3) int32, wound outward (:mod:`vrn.volume.mesh`).
        colors: (V, 3) uint8 RGB sampled from the photo at (x, y).
        transform: image px -> crop px of this face's crop.
        landmarks: (68, 2) float64 detector landmarks, image px.
        box: (4,) float64 detector box x1, y1, x2, y2, image px.
        score: detector confidence.
        face_index: position among the photo's faces (left to right).
        code: compact occupancy (``prob > threshold``) in crop px, or None (``keep=None``).
        prob: (D, H, W) float32 occupancy probabilities in crop px (``keep="prob"``), else None.
        crop: (S, S, 3) uint8 RGB network input (S = the layout's ``crop_size``).
        timings: seconds spent per stage on this face (``marching_cubes``, ``colour``, ...).
        confidence: (V,) float32 in [0, 1] per-vertex confidence: the slope of the occupancy
            probability across the surface (:func:`vrn.volume.confidence.vertex_confidence`;
            1 = a sharp 0 -> 1 step, near 0 = a smeared one). Written to .ply as ``float quality``.
        pose: head pose (yaw, pitch, roll degrees, AFLW2000-3D ``Pose_Para`` convention) from a
            template fit to the predicted surface (:mod:`vrn.pose_landmarks`), or None (no surface,
            or :attr:`Reconstructor.pose_template` None).
        landmarks_3d: (68, 3) float64 image px 3D landmarks (x, y detector; z from the surface
            where visible, from the fitted template where hidden), or None.
        landmarks_visible: (68,) bool, which landmarks took z from the surface, or None.
    """

    verts: np.ndarray
    faces: np.ndarray
    colors: np.ndarray
    transform: CropTransform
    landmarks: np.ndarray
    box: np.ndarray
    score: float
    face_index: int = 0
    code: VolumeCode | None = None
    prob: np.ndarray | None = None
    crop: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
    confidence: np.ndarray | None = None
    pose: HeadPose | None = None
    landmarks_3d: np.ndarray | None = None
    landmarks_visible: np.ndarray | None = None

    @property
    def has_surface(self) -> bool:
        """False when the predicted volume had no crossing of the threshold (empty mesh)."""
        return len(self.verts) > 0 and len(self.faces) > 0

    def verts_crop(self) -> np.ndarray:
        """(V, 3) float64 vertices in crop px (x, y, z; z = image z * scale)."""
        return self.transform.apply(self.verts)

    def export(self, path: str | os.PathLike, colors: bool = True) -> Path:
        """Write the mesh (.obj, .ply with per-vertex colours and ``quality`` = confidence, .glb) atomically."""
        if not self.has_surface:
            raise ValueError("this face has no surface (the predicted volume is empty); nothing to export")
        return export_mesh(path, self.verts, self.faces, self.colors if colors else None, self.confidence)


@dataclass
class PreparedImage:
    """A photo with its faces detected and cropped (what DataLoader workers produce).

    Attributes:
        image: (H, W, 3) uint8 RGB.
        detections: one per face, left to right (box, score, landmarks in image px).
        crops: (K, S, S, 3) uint8 RGB VRN crops (S = the layout's ``crop_size``).
        transforms: K image px -> crop px transforms.
        path: the file it came from (None for arrays).
        timings: seconds for ``read``, ``detect``, ``crop``.
    """

    image: np.ndarray
    detections: list[Detection]
    crops: np.ndarray
    transforms: list[CropTransform]
    path: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.detections)

    def crop_landmarks(self) -> np.ndarray:
        """(K, 68, 2) float32 each face's detector landmarks in its crop's px (x, y): the
        guidance of a guided network (:mod:`vrn.models.guidance`)."""
        if not self.detections:
            return np.zeros((0, N_LANDMARKS, 2), np.float32)
        return np.stack(
            [t.apply(np.asarray(d.landmarks, np.float64)[:, :2]) for d, t in zip(self.detections, self.transforms)]
        ).astype(np.float32)


# --------------------------------------------------------------------------------------
# stages as functions
# --------------------------------------------------------------------------------------


def prepare_image(
    image: np.ndarray | str | os.PathLike, detector: FaceDetector, layout: VolumeLayout = DEFAULT_LAYOUT
) -> PreparedImage:
    """Read (if a path), detect every face and cut its VRN crop.

    Args:
        image: (H, W, 3) uint8 RGB array, or an image file path.
        detector: a :class:`vrn.detectors.base.FaceDetector`.
        layout: the crop rule's ``crop_size`` (crop side, px), ``face_size`` (``sqrt(w * h)``
            of the landmark box, crop px) and ``source_roi_px`` (the face first resampled to
            3DDFA's ROI of that size, :func:`vrn.geometry.crop.crop_for_layout`); use the
            network's layout (:attr:`Reconstructor.layout`).
    Returns:
        :class:`PreparedImage`; no faces -> empty ``detections`` and (0, S, S, 3) crops.
    Raises:
        vrn.image_io.ImageReadError: the file is missing or not a readable image.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    path = None
    if isinstance(image, (str, os.PathLike)):
        path = str(image)
        image = read_image_rgb(path)
    img = np.ascontiguousarray(image)
    check_rgb_image(img)
    t1 = time.perf_counter()
    timings["read"] = t1 - t0
    dets = detector.detect(img, path)
    t2 = time.perf_counter()
    timings["detect"] = t2 - t1
    crops, transforms = [], []
    for d in dets:
        c, t = crop_for_layout(img, d.landmarks, layout)
        crops.append(c)
        transforms.append(t)
    timings["crop"] = time.perf_counter() - t2
    arr = np.stack(crops) if crops else np.zeros((0, layout.crop_size, layout.crop_size, 3), np.uint8)
    return PreparedImage(img, list(dets), arr, transforms, path, timings)


def volume_to_image_mesh(
    prob: np.ndarray, transform: CropTransform, threshold: float = 0.5, depth_factor: float = DEPTH_FACTOR
) -> tuple[np.ndarray, np.ndarray]:
    """The post-processing: marching cubes -> crop px -> image px.

    Args:
        prob: (D, H, W) float occupancy probabilities (or a bool volume), crop px, ``[d, r, c]``.
        transform: image px -> crop px of the crop the volume was predicted from.
        threshold: iso level (0.5).
        depth_factor: depth bins per crop px (the layout's ``depth_factor``).
    Returns:
        verts: (V, 3) float32 image px (x, y, z); z = crop z / ``transform.scale``.
        faces: (F, 3) int32 (winding kept: the crop similarity has positive determinant).
        Both (0, 3) when the volume never crosses ``threshold``.
    """
    verts_crop, faces = volume_to_mesh(prob, level=threshold, depth_factor=depth_factor)
    if len(verts_crop) == 0:
        return verts_crop, faces
    verts = transform.apply_inverse(verts_crop).astype(np.float32)
    if np.linalg.det(transform.matrix[:, :2]) < 0:  # a mirroring crop flips the winding
        faces = np.ascontiguousarray(faces[:, ::-1])
    return verts, faces


def sample_vertex_colors(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinear RGB of ``image`` at points ``xy`` (pixel-centre convention, clamped to the border).

    Args:
        image: (H, W, 3) uint8 RGB.
        xy: (V, 2+) float image px (x, y); extra columns ignored.
    Returns:
        (V, 3) uint8.
    """
    img = np.asarray(image)
    H, W = img.shape[:2]
    p = np.asarray(xy, dtype=np.float64)
    if len(p) == 0:
        return np.zeros((0, 3), np.uint8)
    x = np.clip(p[:, 0], 0.0, W - 1.0)
    y = np.clip(p[:, 1], 0.0, H - 1.0)
    x0 = np.minimum(np.floor(x).astype(np.int64), W - 2) if W > 1 else np.zeros(len(x), np.int64)
    y0 = np.minimum(np.floor(y).astype(np.int64), H - 2) if H > 1 else np.zeros(len(y), np.int64)
    x1 = np.minimum(x0 + 1, W - 1)
    y1 = np.minimum(y0 + 1, H - 1)
    wx = (x - x0)[:, None]
    wy = (y - y0)[:, None]
    f = img.astype(np.float32)
    top = f[y0, x0] * (1 - wx) + f[y0, x1] * wx
    bot = f[y1, x0] * (1 - wx) + f[y1, x1] * wx
    return np.clip(np.rint(top * (1 - wy) + bot * wy), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------
# the reconstructor
# --------------------------------------------------------------------------------------


def _to_input(crops: np.ndarray | torch.Tensor, crop_size: int | None = None) -> torch.Tensor:
    """(B, 3, S, S) uint8 / float [0, 1] (numpy or torch) -> float32 [0, 1] CPU tensor.
    (B, S, S, 3) uint8 is accepted too (channels last, as crops come from OpenCV).

    Raises:
        ValueError: (one line) not an array of crops, another dtype (bool, int), float values
            outside [0, 1] (e.g. [0, 255]) or not finite, or a side other than ``crop_size``.
    """
    try:
        x = torch.as_tensor(crops)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"crops must be an array of RGB crops (numpy or torch), got {type(crops).__name__}") from e
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"crops must be (B, 3, H, W), got {tuple(x.shape)}")
    if x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] != 3:
        raise ValueError(f"crops must be (B, 3, H, W) RGB, got {tuple(x.shape)}")
    if crop_size is not None and tuple(x.shape[-2:]) != (crop_size, crop_size):
        raise ValueError(
            f"crops must be {crop_size}x{crop_size} (this network's layout), got {x.shape[-2]}x{x.shape[-1]}: "
            f"cut them with vrn.geometry.crop.crop_for_layout (or Reconstructor.detect)"
        )
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if not x.dtype.is_floating_point:
        raise ValueError(f"crops must be uint8 [0, 255] or float [0, 1], got {x.dtype}: convert them first")
    x = x.float()
    if x.numel():
        if not torch.isfinite(x).all():
            raise ValueError("crops hold NaN or infinite values: pass finite values in [0, 1]")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            hint = "divide by 255 (or pass uint8)" if hi <= 255 + 1e-3 and lo >= 0 else "scale them to [0, 1]"
            raise ValueError(f"float crops must be in [0, 1], got values in [{lo:g}, {hi:g}]: {hint}")
        x = x.clamp_(0.0, 1.0)
    return x


#: detectors whose landmarks are those the guided models were trained with (the 3DDFA_V2 port's)
GUIDANCE_DETECTORS = ("tddfa", "tddfa_roi")


class Reconstructor:
    """A trained VRN with its face detector and post-processing.

    Args:
        net: the network (logits (B, D, H, W)), or a :class:`vrn.export.OnnxNetwork`
            (probabilities; ``backend="onnxruntime"``).
        device: "cpu", "cuda", "cuda:1", ...
        precision: "32" or "bf16" (autocast; "16" on CUDA too); see :data:`PRECISIONS`.
        detector: a detector name ("tddfa", "fan", "dlib"; see
            :mod:`vrn.detectors`), a ``FaceDetector``, or None (then only
            :meth:`reconstruct_crops` / :meth:`reconstruct_prepared` work).
        threshold: marching-cubes level on the probabilities (0.5).
        layout: the crop / volume layout the network was trained with (crop size, face size
            and depth factor of the crop rule and the post-processing); None =
            :data:`~vrn.conventions.DEFAULT_LAYOUT` with the network's depth bins.
            :meth:`from_checkpoint` passes the checkpoint's.
        batch_size: crops per network call.
        detector_device: the detector's device (default: ``device``).
        model_spec: the spec the network was built from (kept for :meth:`save`).
        backend: "torch", or "onnxruntime" (a torch ``net`` is exported to ONNX in memory;
            precision "32" only). None: "onnxruntime" for an ``OnnxNetwork``, else "torch".
        flip_tta: flip test-time augmentation: the probabilities are the mean of the crop's and
            the mirrored prediction of the mirrored crop (twice the network time; the result
            is exactly mirror-symmetric in the input). On by default since the shipped model
            learnt from flip-averaged targets: with it the AFLW val surface NME is 3.19 -> 3.05 %
            on the photo path and 2.51 -> 2.32 % on the packed crops, better in every yaw bucket
            (docs/benchmarks.md, session 10); False halves the network time.

    Attributes:
        layout: the :class:`~vrn.conventions.VolumeLayout` in use.
        depth_factor: ``layout.depth_factor`` (depth bins per crop px).
    """

    def __init__(
        self,
        net: nn.Module,
        device: str | torch.device = "cpu",
        precision: str = "32",
        detector: str | FaceDetector | None = DEFAULT_DETECTOR,
        threshold: float = 0.5,
        layout: VolumeLayout | None = None,
        batch_size: int = 8,
        detector_device: str | None = None,
        model_spec: dict[str, Any] | None = None,
        detector_kwargs: dict[str, Any] | None = None,
        backend: str | None = None,
        flip_tta: bool = DEFAULT_FLIP_TTA,
    ) -> None:
        precision = str(precision)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        check_device(str(device))
        self.device = torch.device(device)
        self.precision = precision
        self.autocast_dtype = PRECISIONS[precision]
        if self.autocast_dtype == torch.float16 and self.device.type == "cpu":
            raise ValueError("precision=16 needs a CUDA device; use bf16 or 32 on CPU")
        if backend is None:
            backend = "onnxruntime" if isinstance(net, OnnxNetwork) else "torch"
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        self.backend = backend
        if layout is None and isinstance(net, OnnxNetwork):
            layout = net.layout
        self.layout = layout_for_network(net, layout)
        check_network_layout(net, self.layout)
        #: the onnxruntime session wrapper (backend "onnxruntime"), else None
        self.onnx: OnnxNetwork | None = None
        if backend == "onnxruntime":
            if self.autocast_dtype is not None:
                raise ValueError(f"backend=onnxruntime runs float32 only: use precision=32, not {precision}")
            if not isinstance(net, OnnxNetwork):
                net = OnnxNetwork(onnx_bytes(net, self.layout, model_spec), device=str(self.device))
            self.onnx = net
            self.net: nn.Module | OnnxNetwork = net
        elif isinstance(net, OnnxNetwork):
            raise ValueError("an ONNX model runs with backend='onnxruntime' (or load the .ckpt for torch)")
        else:
            self.net = net.to(self.device).eval()
        if self.device.type == "cuda" and self.onnx is None:
            torch.backends.cudnn.benchmark = True  # one input size (the crop): pick the fastest kernels once
        self.threshold = float(threshold)
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.depth_factor = self.layout.depth_factor
        self.batch_size = max(1, int(batch_size))
        self.flip_tta = bool(flip_tta)
        self.model_spec = dict(model_spec or (self.onnx.model_spec if self.onnx is not None else {}))
        if isinstance(detector, str):
            detector = get_detector(detector, device=detector_device or str(self.device), **(detector_kwargs or {}))
        self.detector = detector
        name = getattr(detector, "name", None)
        if detector is not None and self.needs_landmarks and name not in GUIDANCE_DETECTORS:
            log.warning(
                f"guided model with detector {name!r}: it learnt from the 3DDFA_V2 port's landmarks (detector=tddfa), "
                f"whose convention other detectors need not share (most visibly the jaw line of profiles)"
            )
        #: seconds per stage of the last :meth:`__call__`
        self.timings: dict[str, float] = {}
        #: face template of the pose / 3D-landmark fit ("bfm": AFLW2000-3D's frame; None: skip it)
        self.pose_template: str | None = "bfm"

    # ---- construction -----------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls,
        path_or_url: str | os.PathLike,
        device: str = "cpu",
        precision: str = "32",
        detector: str | FaceDetector | None = DEFAULT_DETECTOR,
        threshold: float = 0.5,
        cache_dir: str | os.PathLike | None = None,
        weights_only: bool = True,
        backend: str | None = None,
        **kwargs: Any,
    ) -> Reconstructor:
        """Load a checkpoint (file or URL) and build the network from its stored spec.

        Args:
            path_or_url: ``.ckpt`` path or http(s) URL (downloaded once into the cache), a
                shipped model's name (``"pretrained"``, or a key of ``PRETRAINED_MODELS``), or
                a ``.onnx`` file of :mod:`vrn.export` (spec and layout from its metadata).
            device, precision, detector, threshold: see the class.
            cache_dir: download folder for URLs.
            weights_only: see :func:`load_network`.
            backend: "torch" or "onnxruntime"; None: "onnxruntime" for ``.onnx``, else "torch".
            kwargs: other :class:`Reconstructor` arguments (batch_size, detector_device, ...).
        """
        if is_onnx_file(path_or_url):
            if backend not in (None, "onnxruntime"):
                raise ValueError(f"{path_or_url} is an ONNX model: it runs with backend=onnxruntime, not {backend}")
            p = Path(os.path.expanduser(str(path_or_url)))
            if not p.is_file():
                raise FileNotFoundError(f"ONNX model not found: {p}. Write one with `python -m vrn.export ckpt=...`")
            onnx_net = OnnxNetwork(p, device=device)
            return cls(
                onnx_net,
                device=device,
                precision=precision,
                detector=detector,
                threshold=threshold,
                model_spec=onnx_net.model_spec,
                layout=onnx_net.layout,
                backend="onnxruntime",
                **kwargs,
            )
        path = resolve_model_file(path_or_url, cache_dir)
        net, spec, layout = load_network(path, "cpu", weights_only=weights_only)
        return cls(
            net,
            device=device,
            precision=precision,
            detector=detector,
            threshold=threshold,
            model_spec=spec,
            layout=layout,
            backend=backend,
            **kwargs,
        )

    @classmethod
    def from_pretrained(cls, name: str = DEFAULT_PRETRAINED, **kwargs: Any) -> Reconstructor:
        """The project's pretrained model (shipped in the package, checked by sha256).

        Args:
            name: a registered pretrained model (:data:`PRETRAINED_MODELS`).
            kwargs: :meth:`from_checkpoint` arguments (device, precision, detector, ...).
        """
        return cls.from_checkpoint(pretrained_path(name), **kwargs)

    @classmethod
    def from_run_config(cls, cfg: Mapping[str, Any]) -> Reconstructor:
        """The network of a demo / evaluation config (keys ``ckpt`` (null: the pretrained
        model), ``device``, ``precision``, ``threshold``, ``batch_size``, ``backend`` (null:
        onnxruntime for a ``.onnx`` ckpt, else torch), ``flip_tta``), without a detector (the
        caller runs its own)."""
        ckpt = cfg.get("ckpt")
        path = str(ckpt) if ckpt not in (None, "") else "pretrained"  # from_checkpoint resolves names
        try:
            return cls.from_checkpoint(
                path,
                device=str(cfg.get("device", "cpu")),
                precision=str(cfg.get("precision", "32")),
                detector=None,
                threshold=float(cfg.get("threshold", 0.5)),
                batch_size=int(cfg.get("batch_size", 8)),
                backend=cfg.get("backend") or None,
                flip_tta=bool(cfg.get("flip_tta", DEFAULT_FLIP_TTA)),
            )
        except ImportError as e:  # onnxruntime / onnx missing: the message says what to install
            raise UserError(str(e)) from e
        except (RuntimeError, ValueError, FileNotFoundError) as e:  # not a loadable checkpoint
            raise UserError(f"ckpt={ckpt}: {' '.join(str(e).split())}") from e

    def save(self, path: str | os.PathLike) -> Path:
        """A slim checkpoint (model spec + layout + network weights; loads with :meth:`from_checkpoint`)."""
        if self.onnx is not None:
            raise ValueError("this Reconstructor runs an ONNX model: it has no torch weights to save (copy the .onnx)")
        return save_network(path, self.net, self.model_spec, self.layout)

    # ---- stages -------------------------------------------------------------------------
    def _autocast(self) -> Any:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @property
    def needs_landmarks(self) -> bool:
        """True for a guided network (:mod:`vrn.models.guidance`): :meth:`reconstruct_crops`
        needs each crop's 68 landmarks."""
        return bool(getattr(self.net, "needs_landmarks", False))

    @torch.inference_mode()
    def reconstruct_crops(
        self, crops: np.ndarray | torch.Tensor, landmarks: np.ndarray | torch.Tensor | None = None
    ) -> torch.Tensor:
        """The network on a batch of crops.

        Args:
            crops: (B, 3, S, S) RGB (S = ``layout.crop_size``), uint8 or float in [0, 1]
                (numpy or torch; any device). (B, S, S, 3) uint8 is accepted too.
            landmarks: (B, 68, 2) float each crop's 68 landmarks, crop px (x, y): required by
                a guided network (:attr:`needs_landmarks`; :meth:`PreparedImage.crop_landmarks`),
                ignored by an unguided one.
        Returns:
            (B, D, S, S) float32 occupancy probabilities (sigmoid of the logits; with
            ``flip_tta`` the mean over the crop and its mirror), on the CPU, index
            ``[b, d, r, c]`` in crop px.
        Raises:
            ValueError: (one line) another dtype, values outside [0, 1] (float) or not finite,
                or a crop side other than ``layout.crop_size``.
        """
        x = _to_input(crops, self.layout.crop_size)
        marks = self._guidance(landmarks, len(x))
        p = self._probabilities(x, marks)
        if self.flip_tta and len(x):
            # the mirrored crop's prediction mirrored back (crop columns = x, the last axis)
            flipped = None if marks is None else torch.from_numpy(mirror_landmarks(marks.numpy(), x.shape[-1]))
            p = (p + self._probabilities(x.flip(-1), flipped).flip(-1)) / 2
        return p

    def _guidance(self, landmarks: np.ndarray | torch.Tensor | None, n: int) -> torch.Tensor | None:
        """The crops' landmarks as a (B, 68, 2) float32 CPU tensor for a guided network, else None.

        Raises:
            ValueError: a guided network without landmarks, or landmarks of another shape.
        """
        if not self.needs_landmarks:
            return None
        if landmarks is None:
            raise ValueError(
                f"model {self.model_spec.get('name', 'this network')} is guided by each crop's 68 landmarks: pass "
                f"reconstruct_crops(crops, landmarks) with (B, 68, 2) crop px (PreparedImage.crop_landmarks())"
            )
        m = landmarks if isinstance(landmarks, torch.Tensor) else torch.from_numpy(np.asarray(landmarks, np.float32))
        m = m.detach().float().cpu()
        if m.dim() != 3 or m.shape[0] != n or m.shape[1] != N_LANDMARKS or m.shape[2] < 2:
            raise ValueError(f"landmarks must be ({n}, {N_LANDMARKS}, 2) crop px, one per crop, got {tuple(m.shape)}")
        return m[..., :2].contiguous()

    def _probabilities(self, x: torch.Tensor, marks: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, S, S) float [0, 1] (+ (B, 68, 2) crop px landmarks for a guided network) ->
        (B, D, S, S) float32 probabilities on the CPU, by batches."""
        out = []
        if self.onnx is not None:
            for i in range(0, len(x), self.batch_size):
                mb = None if marks is None else marks[i : i + self.batch_size].numpy()
                out.append(torch.from_numpy(self.onnx(x[i : i + self.batch_size].numpy(), mb)))
            if not out:
                return torch.zeros((0, self.layout.depth_bins) + tuple(x.shape[-2:]))
            return torch.cat(out)
        pin = self.device.type == "cuda"
        for i in range(0, len(x), self.batch_size):
            xb = x[i : i + self.batch_size]
            if pin:
                xb = xb.pin_memory()
            xb = xb.to(self.device, non_blocking=True)
            with self._autocast():
                if marks is None:
                    logits = self.net(xb)
                else:
                    logits = self.net(xb, marks[i : i + self.batch_size].to(self.device))
            out.append(torch.sigmoid(logits.float()).cpu())
        if not out:
            return torch.zeros((0, self.layout.depth_bins) + tuple(x.shape[-2:]))
        return torch.cat(out)

    def postprocess(
        self, prob: np.ndarray | torch.Tensor, transform: CropTransform, image: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
        """Probabilities of one crop -> mesh in image px with per-vertex colours and confidence.

        Args:
            prob: (D, H, W) float probabilities, crop px.
            transform: image px -> crop px of that crop.
            image: (H, W, 3) uint8 RGB photo for the colours (None: grey).
        Returns:
            verts (V, 3) float32 image px, faces (F, 3) int32, colors (V, 3) uint8,
            confidence (V,) float32 in [0, 1] (:func:`vrn.volume.confidence.vertex_confidence`),
            timings (``marching_cubes``, ``colour``, ``confidence`` seconds).
        """
        p = prob.numpy() if isinstance(prob, torch.Tensor) else np.asarray(prob)
        t0 = time.perf_counter()
        verts, faces = volume_to_image_mesh(p, transform, self.threshold, self.depth_factor)
        t1 = time.perf_counter()
        if image is not None:
            colors = sample_vertex_colors(image, verts)
        else:
            colors = np.full((len(verts), 3), _GREY, np.uint8)
        t2 = time.perf_counter()
        confidence = vertex_confidence(p, transform.apply(verts), self.depth_factor)  # crop px, as the volume
        t3 = time.perf_counter()
        return verts, faces, colors, confidence, {"marching_cubes": t1 - t0, "colour": t2 - t1, "confidence": t3 - t2}

    def pose_landmarks(
        self, prob: np.ndarray | torch.Tensor, transform: CropTransform, landmarks: np.ndarray
    ) -> PoseLandmarks | None:
        """Head pose and 68 3D landmarks of one face (:func:`vrn.pose_landmarks.estimate_pose_landmarks`
        with :attr:`pose_template`); None when ``pose_template`` is None or the volume is empty.
        When the template's model file cannot be found, one warning says so and the fit is
        switched off for this Reconstructor (the meshes are unaffected).

        Args:
            prob: (D, H, W) float probabilities, crop px; transform: image px -> crop px;
            landmarks: (68, 2) detector landmarks, image px.
        """
        if self.pose_template is None:
            return None
        occ = (prob > self.threshold) if isinstance(prob, torch.Tensor) else (np.asarray(prob) > self.threshold)
        try:
            return estimate_pose_landmarks(occ, transform, landmarks, self.pose_template, self.depth_factor)
        except AssetNotFoundError as e:  # the template's model file is missing: meshes still come out
            log.warning(f"head pose and 3D landmarks switched off (pose_template=None): {e}")
            self.pose_template = None
            return None

    def detect(self, image: np.ndarray | str | os.PathLike) -> PreparedImage:
        """Read, detect and crop (see :func:`prepare_image`)."""
        if self.detector is None:
            raise RuntimeError(
                "this Reconstructor has no detector: pass detector='tddfa' (or 'fan', 'dlib'), "
                f"or call reconstruct_crops() on your own {self.layout.crop_size}x"
                f"{self.layout.crop_size} crops"
            )
        return prepare_image(image, self.detector, self.layout)

    def reconstruct_prepared(
        self, prep: PreparedImage, probs: torch.Tensor | None = None, keep: str | None = "code"
    ) -> list[FaceResult]:
        """Faces of a :class:`PreparedImage` (network run here unless ``probs`` is given).

        Args:
            prep: detections and crops of one photo.
            probs: (K, D, H, W) probabilities already computed for ``prep.crops``.
            keep: "code" (compact occupancy in each result), "prob" (also the dense
                probabilities, ~30 MB per face), or None.
        """
        if keep not in ("code", "prob", None):
            raise ValueError(f"keep must be 'code', 'prob' or None, got {keep!r}")
        if len(prep) == 0:
            return []
        t0 = time.perf_counter()
        if probs is None:
            probs = self.reconstruct_crops(prep.crops, prep.crop_landmarks())
        t_net = time.perf_counter() - t0
        results = []
        for k, (det, t) in enumerate(zip(prep.detections, prep.transforms)):
            p = probs[k].numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs[k])
            verts, faces, colors, confidence, tm = self.postprocess(p, t, prep.image)
            tc = time.perf_counter()
            code = encode(p > self.threshold) if keep is not None else None
            tm["encode"] = time.perf_counter() - tc
            tm["network"] = t_net / len(prep)
            tp = time.perf_counter()
            marks = self.pose_landmarks(p, t, np.asarray(det.landmarks, np.float64)[:, :2])
            tm["pose"] = time.perf_counter() - tp
            results.append(
                FaceResult(
                    verts=verts,
                    faces=faces,
                    colors=colors,
                    transform=t,
                    landmarks=np.asarray(det.landmarks, np.float64),
                    box=np.asarray(det.box, np.float64),
                    score=float(det.score),
                    face_index=k,
                    code=code,
                    prob=p.copy() if keep == "prob" else None,
                    crop=prep.crops[k],
                    timings=tm,
                    confidence=confidence,
                    pose=marks.pose if marks is not None else None,
                    landmarks_3d=marks.landmarks_3d if marks is not None else None,
                    landmarks_visible=marks.visible if marks is not None else None,
                )
            )
        return results

    def __call__(self, image: np.ndarray | str | os.PathLike, keep: str | None = "code") -> list[FaceResult]:
        """Every face of a photo.

        Args:
            image: (H, W, 3) uint8 RGB array or an image file path.
            keep: see :meth:`reconstruct_prepared`.
        Returns:
            one :class:`FaceResult` per detected face, left to right; [] when no face is found.
            A face whose predicted volume is empty has ``has_surface == False``.
        """
        prep = self.detect(image)
        results = self.reconstruct_prepared(prep, keep=keep)
        tm = dict(prep.timings)
        for key in ("network", "marching_cubes", "colour", "confidence", "encode", "pose"):
            tm[key] = sum(r.timings.get(key, 0.0) for r in results)
        self.timings = tm
        return results

    def reconstruct_many(
        self, images: Iterable[np.ndarray | str | os.PathLike], keep: str | None = "code"
    ) -> list[list[FaceResult]]:
        """Several photos; the crops of all of them go through the network in batches."""
        preps = [self.detect(im) for im in images]
        crops = [p.crops for p in preps if len(p)]
        if not crops:
            return [[] for _ in preps]
        marks = np.concatenate([p.crop_landmarks() for p in preps if len(p)])
        probs = self.reconstruct_crops(np.concatenate(crops), marks)
        out, i = [], 0
        for p in preps:
            out.append(self.reconstruct_prepared(p, probs[i : i + len(p)], keep=keep) if len(p) else [])
            i += len(p)
        return out

    def __repr__(self) -> str:
        det = getattr(self.detector, "name", None)
        return (
            f"Reconstructor(model={self.model_spec.get('name', type(self.net).__name__)}, device={self.device}, "
            f"precision={self.precision}, backend={self.backend}, detector={det}, threshold={self.threshold})"
        )
