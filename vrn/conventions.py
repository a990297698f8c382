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
"""

CROP_SIZE: int = 192
DEPTH_BINS: int = 200
DEPTH_FACTOR: float = 2.0
# VRN crop rule: the 68-landmark box is scaled so that sqrt(w*h) = CROP_FACE_SIZE crop px.
CROP_FACE_SIZE: float = 90.0


def depth_centre_z(depth_bins: int = DEPTH_BINS, depth_factor: float = DEPTH_FACTOR) -> float:
    """z (crop px) of the volume's depth centre, where meshes are centred in depth."""
    return depth_bins / (2.0 * depth_factor)
