"""Small rigid / similarity transform helpers in the project's frames (:mod:`vrn.conventions`).

Crop frame: x right, y down, z toward the camera (crop px). Note that this frame is
left-handed; the rotation matrices below are ordinary orthonormal matrices with det +1
acting on (x, y, z) column vectors in it, and the sign conventions are stated in terms of
where the face points after the rotation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from vrn.conventions import CROP_SIZE

__all__ = ["euler_to_matrix", "similarity_2d", "CropTransform"]


def euler_to_matrix(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Head rotation from Euler angles in degrees, crop frame (x right, y down, z to camera).

    ``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)``: applied to a frontal face (looking at the
    camera, +z) as ``posed = R @ frontal`` (column vectors; ``frontal @ R.T`` for (N, 3)
    rows), pitch is applied first, then yaw, then roll.

    - ``Rx(p) = [[1, 0, 0], [0, cos p, -sin p], [0, sin p, cos p]]``: positive pitch turns
      the face up (the nose direction +z moves toward -y, the top of the image).
    - ``Ry(y) = [[cos y, 0, sin y], [0, 1, 0], [-sin y, 0, cos y]]``: positive yaw turns the
      face toward the image's right (+x), i.e. the subject turns to their left.
    - ``Rz(r) = [[cos r, -sin r, 0], [sin r, cos r, 0], [0, 0, 1]]``: positive roll rotates
      the image-plane content clockwise on screen (+x toward +y, y being down).

    Args:
        yaw, pitch, roll: degrees.

    Returns:
        (3, 3) float64 rotation matrix, det +1.
    """
    y, p, r = np.deg2rad([yaw, pitch, roll])
    cy, sy = np.cos(y), np.sin(y)
    cp, sp = np.cos(p), np.sin(p)
    cr, sr = np.cos(r), np.sin(r)
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cp, -sp], [0.0, sp, cp]])
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rz = np.array([[cr, -sr, 0.0], [sr, cr, 0.0], [0.0, 0.0, 1.0]])
    return rz @ ry @ rx


def similarity_2d(scale: float = 1.0, angle_deg: float = 0.0, tx: float = 0.0, ty: float = 0.0) -> np.ndarray:
    """2x3 similarity ``p' = s * Rot(angle) @ p + (tx, ty)`` on (x, y) px.

    ``Rot(a) = [[cos a, -sin a], [sin a, cos a]]``; with y down, positive angles rotate
    clockwise on screen (same sense as ``cv2.getRotationMatrix2D`` with a negated angle).

    Returns:
        (2, 3) float64.
    """
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a) * scale, np.sin(a) * scale
    return np.array([[c, -s, tx], [s, c, ty]], dtype=np.float64)


def _as_affine(m: Any) -> np.ndarray:
    a = np.asarray(m, dtype=np.float64)
    if a.shape != (2, 3):
        raise ValueError(f"affine must be (2, 3), got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("affine contains NaN or inf")
    return a


@dataclass(frozen=True, eq=False)
class CropTransform:
    """Image px -> crop px 2D similarity (the crop of a photo), with its inverse.

    Attributes:
        matrix: (2, 3) float64 affine ``[A | t]`` mapping image px (x, y) to crop px:
            ``crop = A @ img + t``. Expected to be a similarity (``A = s * rotation``);
            :attr:`scale` is ``sqrt(|det A|)``, the factor also applied to depth.
        size: (height, width) of the crop in px.
    """

    matrix: np.ndarray
    size: tuple[int, int] = (CROP_SIZE, CROP_SIZE)

    def __post_init__(self) -> None:
        object.__setattr__(self, "matrix", _as_affine(self.matrix))
        object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))
        if abs(np.linalg.det(self.matrix[:, :2])) < 1e-12:
            raise ValueError("crop affine is singular")

    # ---- constructors -------------------------------------------------------------
    @classmethod
    def from_center_scale(
        cls,
        center_xy: tuple[float, float] | np.ndarray,
        scale: float,
        angle_deg: float = 0.0,
        size: tuple[int, int] = (CROP_SIZE, CROP_SIZE),
    ) -> CropTransform:
        """Crop centred on image point ``center_xy`` (image px), magnified by ``scale``
        (crop px per image px) and rotated by ``angle_deg`` (see :func:`similarity_2d`).
        The centre maps to the crop centre ``((W-1)/2, (H-1)/2)`` (pixel-centre convention).
        """
        h, w = size
        m = similarity_2d(scale, angle_deg)
        c = np.asarray(center_xy, dtype=np.float64).reshape(2)
        m[:, 2] = np.array([(w - 1) / 2.0, (h - 1) / 2.0]) - m[:, :2] @ c
        return cls(m, (h, w))

    @classmethod
    def from_box(
        cls,
        box_xyxy: np.ndarray | tuple[float, float, float, float],
        face_size: float,
        size: tuple[int, int] = (CROP_SIZE, CROP_SIZE),
    ) -> CropTransform:
        """VRN crop rule: centre of the box (x0, y0, x1, y1) in image px to the crop centre,
        scaled so that ``sqrt(w * h)`` of the box becomes ``face_size`` crop px."""
        x0, y0, x1, y1 = (float(v) for v in box_xyxy)
        bw, bh = x1 - x0, y1 - y0
        if bw <= 0 or bh <= 0:
            raise ValueError(f"degenerate box {box_xyxy}")
        return cls.from_center_scale(((x0 + x1) / 2, (y0 + y1) / 2), face_size / np.sqrt(bw * bh), 0.0, size)

    # ---- properties -------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """Crop px per image px: ``sqrt(|det A|)``."""
        return float(np.sqrt(abs(np.linalg.det(self.matrix[:, :2]))))

    @property
    def inverse_matrix(self) -> np.ndarray:
        """(2, 3) float64 affine crop px -> image px."""
        a = np.linalg.inv(self.matrix[:, :2])
        return np.hstack([a, -(a @ self.matrix[:, 2])[:, None]])

    def inverse(self, image_size: tuple[int, int] | None = None) -> CropTransform:
        """The inverse map (crop px -> image px) as a CropTransform; ``size`` is
        ``image_size`` (height, width) when given, else the crop size."""
        return CropTransform(self.inverse_matrix, image_size or self.size)

    def compose(self, other: CropTransform) -> CropTransform:
        """``self`` after ``other``: x -> self(other(x)); size of ``self``."""
        a = self.matrix[:, :2] @ other.matrix[:, :2]
        t = self.matrix[:, :2] @ other.matrix[:, 2] + self.matrix[:, 2]
        return CropTransform(np.hstack([a, t[:, None]]), self.size)

    # ---- application -----------------------------------------------------------------
    def apply(self, points: np.ndarray) -> np.ndarray:
        """Map points image px -> crop px.

        Args:
            points: (N, 2) (x, y) or (N, 3) (x, y, z) float. For (N, 3), z is multiplied by
                :attr:`scale` (no offset: depth centring is the caller's job).
        Returns:
            same shape, float64.
        """
        return self._apply(self.matrix, self.scale, points)

    def apply_inverse(self, points: np.ndarray) -> np.ndarray:
        """Map points crop px -> image px ((N, 2) or (N, 3); z divided by :attr:`scale`)."""
        return self._apply(self.inverse_matrix, 1.0 / self.scale, points)

    @staticmethod
    def _apply(m: np.ndarray, s: float, points: np.ndarray) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] not in (2, 3):
            raise ValueError(f"points must be (N, 2) or (N, 3), got {p.shape}")
        out = np.empty_like(p)
        out[:, :2] = p[:, :2] @ m[:, :2].T + m[:, 2]
        if p.shape[1] == 3:
            out[:, 2] = p[:, 2] * s
        return out

    # ---- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"matrix": [[..3], [..3]], "size": [H, W]}`` (exact float64 round trip)."""
        return {"matrix": [[float(v) for v in row] for row in self.matrix], "size": list(self.size)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CropTransform:
        return cls(np.asarray(d["matrix"], dtype=np.float64), tuple(d.get("size", (CROP_SIZE, CROP_SIZE))))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CropTransform):
            return NotImplemented
        return self.size == other.size and bool(np.array_equal(self.matrix, other.matrix))

    __hash__ = None  # type: ignore[assignment]
