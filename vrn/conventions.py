"""The coordinate and unit conventions every stage shares. Define once, test once.

Colour
    RGB everywhere inside the project. OpenCV I/O converts once, at the boundary
    (:func:`vrn.image_io.read_image_rgb`).

Pixel coordinates ("image px" for the photo, "crop px" for the 192x192 VRN crop)
    x = column (right), y = row (down); the origin is the *centre* of the top-left
    pixel, so pixel (r, c) covers [c-0.5, c+0.5] x [r-0.5, r+0.5].

Depth
    z points toward the camera, in the same unit as x/y (crop px). The volume's depth
    bin index is ``d = DEPTH_FACTOR * z`` (the original VRN uses 2), ``DEPTH_BINS`` = 200
    bins. Meshes are shifted in z so that the midpoint of their target *solid*'s depth range
    (surface + back plane, see :func:`vrn.volume.voxelize.solid_depth_shift`) lands at
    ``z = DEPTH_BINS / (2 * DEPTH_FACTOR)`` (the volume's depth centre), except that the
    visible surface always stays inside (a solid deeper than the volume loses its back);
    the synthetic generator and the data pipeline's fit stage both do this.

Volume index order
    ``[d, r, c]`` = (depth bin, row = y, column = x); d grows toward the camera.
    A voxel (d, r, c) is occupied when the point (x=c, y=r, z=(d+0.5)/DEPTH_FACTOR)
    is inside the solid. A mesh extracted from the volume maps back with
    ``x = c, y = r, z = (d + 0.5) / DEPTH_FACTOR``.

Target
    A solid: the face surface filled back to a plane behind the face, in the face's own
    (frontal) frame, then posed. Never a shell of surface voxels.

Network input
    float32 RGB in [0, 1], shape (B, 3, CROP_SIZE, CROP_SIZE); logits (B, DEPTH_BINS, H, W).

Source resolution of the crops (``VolumeLayout.source_roi_px``)
    0: the crop is cut straight from the photo (synthetic faces, 300W-LP, your photos).
    N > 0: the training photos were 3DDFA-style face crops of N x N px (the AFLW crops:
    ``TDDFA_ROI_PX`` = 120, 3DDFA's regressor input), so the network only ever saw faces
    at that resolution, with a mirrored, blurred margin where the VRN crop reaches past the
    small photo. Inference makes its crops the same way (:func:`vrn.geometry.crop.crop_for_layout`):
    the photo is first cut to 3DDFA's landmark ROI and resampled to N x N px.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "CROP_SIZE",
    "DEPTH_BINS",
    "DEPTH_FACTOR",
    "CROP_FACE_SIZE",
    "VolumeLayout",
    "DEFAULT_LAYOUT",
    "TDDFA_ROI_PX",
    "VOLUME_FIELDS",
    "LayoutMismatchError",
    "depth_centre_z",
]

CROP_SIZE: int = 192
DEPTH_BINS: int = 200
DEPTH_FACTOR: float = 2.0
# VRN crop rule: the 68-landmark box is scaled so that sqrt(w*h) = CROP_FACE_SIZE crop px.
CROP_FACE_SIZE: float = 90.0
# side of 3DDFA's regressor input, px: the size of the AFLW training crops (``source_roi_px``)
TDDFA_ROI_PX: int = 120


#: the layout values a dataset and a model must share
VOLUME_FIELDS: tuple[str, ...] = ("crop_size", "face_size", "depth_bins", "depth_factor")


class LayoutMismatchError(ValueError):
    """Two parts of a run (dataset, model, checkpoint) were made with different layouts."""


@dataclass(frozen=True)
class VolumeLayout:
    """The crop and volume layout, the one source of truth for these numbers.

    Recorded in every packed dataset's ``meta.json`` (key ``layout``) and in every
    checkpoint (``hyper_parameters["layout"]``); checked when a dataset meets a model
    (the four volume numbers; ``source_roi_px`` is inherited from the training data);
    :class:`vrn.Reconstructor` and evaluation take it from the checkpoint.

    Attributes:
        crop_size: side of the square network input, crop px.
        face_size: ``sqrt(w * h)`` of the 68-landmark box in the crop, crop px.
        depth_bins: depth bins of the volume (network output channels).
        depth_factor: depth bins per crop px (``d = depth_factor * z``).
        source_roi_px: 0 = crops cut straight from the photo; N > 0 = the training photos
            were N x N px 3DDFA face crops, and inference resamples the face the same way
            (module doc).
    """

    crop_size: int = CROP_SIZE
    face_size: float = CROP_FACE_SIZE
    depth_bins: int = DEPTH_BINS
    depth_factor: float = DEPTH_FACTOR
    source_roi_px: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop_size", int(self.crop_size))
        object.__setattr__(self, "face_size", float(self.face_size))
        object.__setattr__(self, "depth_bins", int(self.depth_bins))
        object.__setattr__(self, "depth_factor", float(self.depth_factor))
        object.__setattr__(self, "source_roi_px", int(self.source_roi_px))
        if self.crop_size <= 0 or self.depth_bins <= 0 or self.face_size <= 0 or self.depth_factor <= 0:
            raise ValueError(f"layout values must be positive, got {self}")
        if self.source_roi_px < 0:
            raise ValueError(f"source_roi_px must be 0 (crops from the photo) or a crop side in px, got {self}")

    def to_dict(self) -> dict[str, Any]:
        """The recorded form; ``source_roi_px`` only when set (layouts of crops cut straight from
        photos stay as they were recorded before the field existed)."""
        d = asdict(self)
        if not d["source_roi_px"]:
            del d["source_roi_px"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> VolumeLayout:
        """From a recorded dict; None or missing keys -> the defaults (files written before
        layouts were recorded used the defaults)."""
        d = dict(d or {})
        known = {k: d[k] for k in (*VOLUME_FIELDS, "source_roi_px") if k in d}
        return cls(**known)

    def check_matches(self, other: VolumeLayout, this: str, that: str) -> None:
        """Raise :class:`LayoutMismatchError` naming both sides and every differing value of
        :data:`VOLUME_FIELDS` (``source_roi_px`` describes the photos, not the volume: a model
        takes it from its training data)."""
        diff = [
            f"{k}: {getattr(self, k)} ({this}) vs {getattr(other, k)} ({that})"
            for k in VOLUME_FIELDS
            if getattr(self, k) != getattr(other, k)
        ]
        if diff:
            raise LayoutMismatchError(
                f"{this} and {that} use different crop/volume layouts: "
                + "; ".join(diff)
                + ". Rebuild one of them with the other's layout."
            )

    @property
    def depth_centre_z(self) -> float:
        """z (crop px) of the volume's depth centre, where meshes are centred in depth."""
        return self.depth_bins / (2.0 * self.depth_factor)


DEFAULT_LAYOUT = VolumeLayout()


def depth_centre_z(depth_bins: int = DEPTH_BINS, depth_factor: float = DEPTH_FACTOR) -> float:
    """z (crop px) of the volume's depth centre, where meshes are centred in depth."""
    return depth_bins / (2.0 * depth_factor)
