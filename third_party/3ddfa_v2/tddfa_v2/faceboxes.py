"""FaceBoxes face detector (Zhang et al., IJCB 2017) as shipped with 3DDFA_V2.

This is our own re-implementation of the inference path of the detector that
3DDFA_V2 (cleardusk/3DDFA_V2, MIT) uses in its demos, written to reproduce the
upstream numbers on the upstream weights ``FaceBoxesProd.pth``:

* network: CReLU stem, two max-pools, three Inception blocks, two stride-2 stages,
  three multibox heads (21, 1 and 1 anchors per cell at strides 32, 64, 128);
* anchors: SSD-style centre/size priors in [0, 1] units, with the FaceBoxes anchor
  densification (4x4 offsets for 32 px anchors, 2x2 for 64 px anchors);
* decoding with variances (0.1, 0.2);
* preprocessing: downscale so that the image fits 720 x 1080 (h x w), BGR mean
  subtraction (104, 117, 123), no scaling of the value range;
* post-processing: score > 0.05, top 5000, greedy NMS at IoU 0.3 (with the "+1"
  pixel convention of the Fast R-CNN CPU NMS), top 750, then score > 0.5.

The public API takes **RGB** images (the project's convention); the channel flip to
the network's BGR order happens exactly once, inside :meth:`FaceBoxesDetector.__call__`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FaceBoxesConfig",
    "FaceBoxesNet",
    "FaceBoxesDetector",
    "prior_boxes",
    "decode_boxes",
    "nms",
    "check_rgb_image",
]


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaceBoxesConfig:
    """Constants of the upstream detector (values of the 3DDFA_V2 release)."""

    min_sizes: tuple[tuple[int, ...], ...] = ((32, 64, 128), (256,), (512,))
    steps: tuple[int, ...] = (32, 64, 128)
    variance: tuple[float, float] = (0.1, 0.2)
    bgr_mean: tuple[float, float, float] = (104.0, 117.0, 123.0)
    max_height: int = 720
    max_width: int = 1080
    confidence_threshold: float = 0.05  # before NMS
    top_k: int = 5000  # kept before NMS
    nms_threshold: float = 0.3
    keep_top_k: int = 750  # kept after NMS
    score_threshold: float = 0.5  # final ("vis_thres" upstream), strict ">"


DEFAULT_CONFIG = FaceBoxesConfig()


def check_rgb_image(image: np.ndarray) -> None:
    """Raise ``ValueError`` unless ``image`` is an (H, W, 3) uint8 array."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"expected an (H, W, 3) uint8 numpy image, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected an (H, W, 3) uint8 RGB image, got shape {tuple(image.shape)} and dtype {image.dtype}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"empty image of shape {tuple(image.shape)}")


# --------------------------------------------------------------------------------------
# network
# --------------------------------------------------------------------------------------
# Module attribute names follow the upstream checkpoint's state_dict keys so that the
# released weights load without renaming.


class _ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm + ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class _CReLU(nn.Module):
    """Conv + BatchNorm, then concatenated ReLU: ``relu(cat(x, -x))`` doubles the channels."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return F.relu(torch.cat((y, -y), dim=1))


class _Inception(nn.Module):
    """FaceBoxes Inception block: 128 -> 4 x 32 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(128, 32, 1)
        self.branch1x1_2 = _ConvBN(128, 32, 1)  # after a 3x3 average pool
        self.branch3x3_reduce = _ConvBN(128, 24, 1)
        self.branch3x3 = _ConvBN(24, 32, 3, padding=1)
        self.branch3x3_reduce_2 = _ConvBN(128, 24, 1)
        self.branch3x3_2 = _ConvBN(24, 32, 3, padding=1)
        self.branch3x3_3 = _ConvBN(32, 32, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch1x1_2(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        c = self.branch3x3(self.branch3x3_reduce(x))
        d = self.branch3x3_3(self.branch3x3_2(self.branch3x3_reduce_2(x)))
        return torch.cat((a, b, c, d), dim=1)


class FaceBoxesNet(nn.Module):
    """FaceBoxes network (test phase): returns box offsets and face probabilities.

    ``forward(x)`` with ``x`` of shape (B, 3, H, W) (BGR, mean-subtracted) returns
    ``loc`` (B, P, 4) and ``prob`` (B, P, 2) (softmax over background/face), where the
    P anchors are ordered as :func:`prior_boxes` lists them.
    """

    #: anchors per feature-map cell at each of the three detection levels
    ANCHORS_PER_CELL = (21, 1, 1)

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = _CReLU(3, 24, 7, stride=4, padding=3)
        self.conv2 = _CReLU(48, 64, 5, stride=2, padding=2)
        self.inception1 = _Inception()
        self.inception2 = _Inception()
        self.inception3 = _Inception()
        self.conv3_1 = _ConvBN(128, 128, 1)
        self.conv3_2 = _ConvBN(128, 256, 3, stride=2, padding=1)
        self.conv4_1 = _ConvBN(256, 128, 1)
        self.conv4_2 = _ConvBN(128, 256, 3, stride=2, padding=1)
        chans = (128, 256, 256)
        self.loc = nn.Sequential(*[nn.Conv2d(c, a * 4, 3, padding=1) for c, a in zip(chans, self.ANCHORS_PER_CELL)])
        self.conf = nn.Sequential(
            *[nn.Conv2d(c, a * num_classes, 3, padding=1) for c, a in zip(chans, self.ANCHORS_PER_CELL)]
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)
        x = F.max_pool2d(self.conv2(x), kernel_size=3, stride=2, padding=1)
        f1 = self.inception3(self.inception2(self.inception1(x)))
        f2 = self.conv3_2(self.conv3_1(f1))
        f3 = self.conv4_2(self.conv4_1(f2))
        b = x.shape[0]
        locs, confs = [], []
        for feat, loc_head, conf_head in zip((f1, f2, f3), self.loc, self.conf):
            # (B, A*k, h, w) -> (B, h, w, A*k) -> (B, h*w*A, k): cell-major, anchor-minor
            locs.append(loc_head(feat).permute(0, 2, 3, 1).reshape(b, -1, 4))
            confs.append(conf_head(feat).permute(0, 2, 3, 1).reshape(b, -1, self.num_classes))
        loc = torch.cat(locs, dim=1)
        prob = torch.softmax(torch.cat(confs, dim=1), dim=-1)
        return loc, prob


# --------------------------------------------------------------------------------------
# anchors, decoding, NMS
# --------------------------------------------------------------------------------------


def _cell_template(min_size: int, step: int) -> np.ndarray:
    """Offsets (in cell units) of the anchors of one size within one cell, (A, 2) as (ox, oy).

    FaceBoxes densifies small anchors so that they tile the image as densely as the
    large ones: a 32 px anchor on a 32 px stride is repeated 4 x 4 times per cell, a
    64 px anchor 2 x 2 times; others sit at the cell centre. Order: y outer, x inner.
    """
    if min_size == 32:
        offs = np.array([0.0, 0.25, 0.5, 0.75])
    elif min_size == 64:
        offs = np.array([0.0, 0.5])
    else:
        offs = np.array([0.5])
    oy, ox = np.meshgrid(offs, offs, indexing="ij")
    return np.stack([ox.ravel(), oy.ravel()], axis=1)


def prior_boxes(image_hw: tuple[int, int], config: FaceBoxesConfig = DEFAULT_CONFIG) -> np.ndarray:
    """All anchors for an input of size ``image_hw`` as (P, 4) float32 ``cx, cy, w, h``.

    Coordinates are relative to the image (x / W, y / H). The order matches the
    network's flattened head outputs: level, then cell (row-major), then anchor size,
    then densified position.
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    levels = []
    for step, sizes in zip(config.steps, config.min_sizes):
        fh, fw = math.ceil(h / step), math.ceil(w / step)
        # per-cell template: (A, 4) = ox, oy (cell units), size_x, size_y (relative)
        parts = []
        for s in sizes:
            off = _cell_template(s, step)
            wh = np.tile([s / w, s / h], (len(off), 1))
            parts.append(np.concatenate([off, wh], axis=1))
        tmpl = np.concatenate(parts, axis=0)  # (A, 4)
        ii, jj = np.meshgrid(np.arange(fh, dtype=np.float64), np.arange(fw, dtype=np.float64), indexing="ij")
        jj = jj.reshape(-1, 1)
        ii = ii.reshape(-1, 1)
        cx = (jj + tmpl[None, :, 0]) * step / w  # (cells, A)
        cy = (ii + tmpl[None, :, 1]) * step / h
        sw = np.broadcast_to(tmpl[None, :, 2], cx.shape)
        sh = np.broadcast_to(tmpl[None, :, 3], cx.shape)
        levels.append(np.stack([cx, cy, sw, sh], axis=-1).reshape(-1, 4))
    return np.concatenate(levels, axis=0).astype(np.float32)


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor, variance: Sequence[float] = (0.1, 0.2)) -> torch.Tensor:
    """Undo the SSD box encoding: (P, 4) offsets + (P, 4) priors -> (P, 4) ``x1, y1, x2, y2``.

    Output is in the priors' relative units (multiply by W, H for pixels).
    """
    centre = priors[:, :2] + loc[:, :2] * variance[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(loc[:, 2:] * variance[1])
    top_left = centre - size / 2
    return torch.cat((top_left, top_left + size), dim=1)


def nms(dets: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept row indices, best score first.

    ``dets`` is (N, 5) ``x1, y1, x2, y2, score``. Areas and overlaps use the inclusive
    pixel convention (``x2 - x1 + 1``) of the Fast R-CNN CPU NMS that upstream uses; a
    box is dropped when its IoU with a kept box is ``>= threshold``. Arithmetic is done
    in float32 like the upstream Cython kernel.
    """
    if dets.shape[0] == 0:
        return np.zeros((0,), dtype=np.int64)
    d = np.asarray(dets, dtype=np.float32)
    x1, y1, x2, y2, scores = d[:, 0], d[:, 1], d[:, 2], d[:, 3], d[:, 4]
    one, zero = np.float32(1.0), np.float32(0.0)
    areas = (x2 - x1 + one) * (y2 - y1 + one)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.maximum(zero, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + one)
        h = np.maximum(zero, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + one)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou < threshold]
    return np.asarray(keep, dtype=np.int64)


# --------------------------------------------------------------------------------------
# detector
# --------------------------------------------------------------------------------------


def _resize_scale(h: int, w: int, max_h: int, max_w: int) -> float:
    """Upstream's downscale factor: fit the height to ``max_h``, then the width to ``max_w``."""
    scale = 1.0
    if h > max_h:
        scale = max_h / h
    if w * scale > max_w:
        scale *= max_w / (w * scale)
    return scale


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a torch checkpoint's state_dict, unwrapping ``state_dict`` and ``module.``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        ckpt = ckpt["state_dict"]
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in ckpt.items()}


class FaceBoxesDetector:
    """FaceBoxes face detector with the upstream 3DDFA_V2 weights and post-processing.

    Args:
        weights_path: upstream ``FaceBoxes/weights/FaceBoxesProd.pth``.
        device: torch device for the network ("cpu", "cuda", ...).
        score_threshold: final score cut (strict ``>``); ``None`` = upstream's 0.5.
        config: detector constants (defaults reproduce upstream).

    Call with an (H, W, 3) uint8 **RGB** image; returns (N, 5) float32
    ``x1, y1, x2, y2, score`` in image pixels, best score first.

    Raises:
        FileNotFoundError: ``weights_path`` is missing.
    """

    def __init__(
        self,
        weights_path: str | os.PathLike,
        device: str | torch.device = "cpu",
        score_threshold: float | None = None,
        config: FaceBoxesConfig = DEFAULT_CONFIG,
    ) -> None:
        self.config = config
        self.score_threshold = config.score_threshold if score_threshold is None else float(score_threshold)
        self.device = torch.device(device)
        net = FaceBoxesNet(num_classes=2)
        state = load_state_dict(weights_path)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing:
            raise RuntimeError(f"FaceBoxes checkpoint {weights_path} lacks weights: {missing[:5]}...")
        self.net = net.to(self.device).eval()
        self._prior_cache: dict[tuple[int, int], torch.Tensor] = {}

    def _priors(self, hw: tuple[int, int]) -> torch.Tensor:
        if hw not in self._prior_cache:
            self._prior_cache[hw] = torch.from_numpy(prior_boxes(hw, self.config)).to(self.device)
        return self._prior_cache[hw]

    @torch.no_grad()
    def __call__(self, image_rgb: np.ndarray) -> np.ndarray:
        check_rgb_image(image_rgb)
        cfg = self.config
        bgr = np.ascontiguousarray(image_rgb[..., ::-1])  # the one RGB -> BGR flip
        h, w = bgr.shape[:2]
        scale = _resize_scale(h, w, cfg.max_height, cfg.max_width)
        if scale != 1.0:
            bgr = cv2.resize(bgr, dsize=(int(scale * w), int(scale * h)))  # bilinear
        img = bgr.astype(np.float32) - np.asarray(cfg.bgr_mean, dtype=np.float32)
        hs, ws = img.shape[:2]
        x = torch.from_numpy(img.transpose(2, 0, 1).copy()).unsqueeze(0).to(self.device)

        loc, prob = self.net(x)
        boxes = decode_boxes(loc[0], self._priors((hs, ws)), cfg.variance)
        px = torch.tensor([ws, hs, ws, hs], dtype=boxes.dtype, device=boxes.device)
        boxes = (boxes * px / scale).cpu().numpy()
        scores = prob[0, :, 1].cpu().numpy()

        sel = np.flatnonzero(scores > cfg.confidence_threshold)
        order = sel[np.argsort(-scores[sel], kind="stable")][: cfg.top_k]
        dets = np.concatenate([boxes[order], scores[order, None]], axis=1).astype(np.float32)
        dets = dets[nms(dets, cfg.nms_threshold)][: cfg.keep_top_k]
        return np.ascontiguousarray(dets[dets[:, 4] > self.score_threshold], dtype=np.float32)
