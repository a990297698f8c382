"""The 68-point iBUG landmark scheme: its size and its mirror order.

Order: 0-16 jaw, 17-21 / 22-26 brows, 27-30 nose bridge, 31-35 nostrils, 36-41 / 42-47 eyes,
48-59 outer lips, 60-67 inner lips (the scheme of 300W, AFLW2000-3D's ``pt3d_68``, the
3DDFA_V2 port and face-alignment). Domain code shared by the guided network
(:mod:`vrn.models.guidance`), augmentation, the detectors' flip averaging and the fit stage.
"""

from __future__ import annotations

import numpy as np

__all__ = ["N_LANDMARKS", "LANDMARK_MIRROR", "mirror_landmarks"]

N_LANDMARKS = 68

#: index of each landmark's mirror image under a horizontal flip (iBUG 68-point scheme)
LANDMARK_MIRROR = np.array(
    list(range(16, -1, -1))  # jaw
    + list(range(26, 21, -1))  # brows (17-21 <-> 26-22)
    + list(range(21, 16, -1))
    + [27, 28, 29, 30]  # nose bridge
    + [35, 34, 33, 32, 31]  # nostrils
    + [45, 44, 43, 42, 47, 46]  # eye 36-41 <-> 45, 44, 43, 42, 47, 46
    + [39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]  # outer lips
    + [64, 63, 62, 61, 60, 67, 66, 65],  # inner lips
    dtype=np.int64,
)


def mirror_landmarks(xy: np.ndarray, width: int) -> np.ndarray:
    """The landmarks of the horizontally mirrored crop.

    Args:
        xy: (..., 68, 2+) landmarks, crop px (x right, pixel centres at integers).
        width: crop width in px.
    Returns:
        same shape, float64: x -> ``width - 1 - x``, rows reordered so index k is again landmark k.
    """
    out = np.array(xy, dtype=np.float64)
    out[..., 0] = (width - 1) - out[..., 0]
    return out[..., LANDMARK_MIRROR, :]
